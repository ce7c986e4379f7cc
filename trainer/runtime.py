"""What the process runs on, and how it is asked to stop: device and precision, malloc tuning, TF32,
signals (SIGTERM, SIGINT, SIGUSR1, and the launcher exiting)."""

from __future__ import annotations

import ctypes
import functools
import os
import shlex
import signal
import sys
from pathlib import Path

from trainer.config import ConfigError

# glibc returns large freed blocks to the OS and maps new ones, so each step's fresh 31 MB embedding
# gradient page-faults again (slow on VMs). Keeping freed memory in the heap is up to 2x faster on CPU.
MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"


def use_malloc_tunables() -> None:
    """Re-exec this process with MALLOC_TUNABLES (glibc reads them at start only); TRAINER_MALLOC_TUNING=0 skips it."""
    if (sys.platform == "linux" and "GLIBC_TUNABLES" not in os.environ
            and os.environ.get("TRAINER_MALLOC_TUNING", "1") != "0"):
        os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def cuda_in_use() -> bool:
    """CUDA is there and not switched off (accelerate's use_cpu / ACCELERATE_USE_CPU)."""
    import torch

    return torch.cuda.is_available() and not env_flag("ACCELERATE_USE_CPU")


def force_cpu() -> bool:
    """Accelerate's `cpu=` flag: on when CUDA is not in use, except under DeepSpeed, which places the
    model itself (and on a CPU machine, with TRAINER_ALLOW_CPU=1, runs on the CPU)."""
    return not cuda_in_use() and not env_flag("ACCELERATE_USE_DEEPSPEED")


def process_group_backend() -> str | None:
    """Accelerate picks no backend for DeepSpeed without CUDA, so it counts one process while DeepSpeed
    joins all ranks with gloo (its CPU accelerator's fallback): DeepSpeed's batch check then fails
    (`4 != 4 * 1 * 2`). Naming gloo makes Accelerate see the same process group. None: Accelerate's choice."""
    return "gloo" if env_flag("ACCELERATE_USE_DEEPSPEED") and not cuda_in_use() else None


def check_device_matches_launch() -> None:
    """A launch that asks for GPUs (a GPU accelerate config, several processes, FSDP, DeepSpeed) on a
    machine where CUDA is not usable stops here, instead of training silently on the CPU.
    TRAINER_ALLOW_CPU=1 lets a DeepSpeed config go on (DeepSpeed runs on the CPU); FSDP is refused."""
    import torch

    check_fsdp_available()
    if cuda_in_use() or env_flag("ACCELERATE_USE_CPU") or env_flag("TRAINER_ALLOW_CPU"):
        return
    launched_by_accelerate = "ACCELERATE_USE_CPU" in os.environ or "LOCAL_RANK" in os.environ
    asked = [what for what, yes in (
        (f"gpu_ids {os.environ.get('CUDA_VISIBLE_DEVICES')}", launched_by_accelerate
         and bool(os.environ.get("CUDA_VISIBLE_DEVICES"))),
        (f"{os.environ.get('WORLD_SIZE')} processes", int(os.environ.get("WORLD_SIZE", "1")) > 1),
        ("DeepSpeed", env_flag("ACCELERATE_USE_DEEPSPEED")),
    ) if yes]
    if asked:
        reason = "no CUDA device" if not torch.cuda.is_available() else "CUDA unusable"
        raise ConfigError(f"the launch asks for GPUs ({', '.join(asked)}) but this machine has {reason} "
                          f"(torch {torch.__version__}); use accelerate_configs/cpu.yaml, or for several CPU "
                          f"processes set ACCELERATE_USE_CPU=1 (accelerate_configs/cpu_2proc.yaml)")


def check_fsdp_available() -> None:
    """Accelerate (1.15) selects FSDP on GPUs only: without CUDA its state falls back to MULTI_CPU, so an
    FSDP config (or --use_fsdp) would train plain DDP with every parameter whole on each process."""
    if env_flag("ACCELERATE_USE_FSDP") and not cuda_in_use():
        import accelerate

        raise ConfigError(f"the launch asks for FSDP, which Accelerate {accelerate.__version__} runs on GPUs only: "
                          f"on this machine's CPU it would train plain DDP (MULTI_CPU, whole parameters on every "
                          f"process); for several CPU processes use ACCELERATE_USE_CPU=1 with "
                          f"accelerate_configs/cpu_2proc.yaml (DDP), or TRAINER_ALLOW_CPU=1 with "
                          f"accelerate_configs/deepspeed_zero2.yaml (sharded optimizer state)")


def check_plugins_match_recipe(accelerator, cfg) -> None:
    """The recipe decides accumulation and clipping: a DeepSpeed config that leaves them out (or "auto")
    gets the recipe's values; one that sets others is refused, since the loop groups and scales
    micro-batches by the recipe. Muon needs whole matrices, so not FSDP's or ZeRO's shards. FSDP gets a
    mixed-precision policy that reduces in fp32; the compiled step's limits are refused here. Called
    before `accelerator.prepare`."""
    from accelerate.utils import DistributedType

    sharded = (accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
               or env_flag("ACCELERATE_USE_FSDP") or env_flag("ACCELERATE_USE_DEEPSPEED"))  # however it was asked for
    check_compiled_step(accelerator, cfg, sharded)
    if accelerator.distributed_type == DistributedType.FSDP and accelerator.mixed_precision in ("bf16", "fp16"):
        set_fsdp_mixed_precision(accelerator.state.fsdp_plugin, accelerator.mixed_precision)
    if cfg.optim.name == "muon" and sharded:
        kind = "FSDP" if env_flag("ACCELERATE_USE_FSDP") else accelerator.distributed_type.value
        raise ConfigError(f"optim.name=muon needs whole weight matrices; {kind} "
                          f"shards them: use DDP (accelerate_configs/multi_gpu.yaml) or --optim.name=adamw")
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    if ds_config.get("bf16", {}).get("enabled"):  # skip overflowing steps in bf16 too, whatever the version default
        ds_config["bf16"].setdefault("check_grad_overflow", True)
    for key, recipe_key, value in (("gradient_accumulation_steps", "train.grad_accum", cfg.train.grad_accum),
                                   ("gradient_clipping", "optim.grad_clip", cfg.optim.grad_clip)):
        if ds_config.get(key, "auto") == "auto":
            ds_config[key] = value
        elif float(ds_config[key]) != float(value):
            raise ConfigError(f"the DeepSpeed config sets {key}={ds_config[key]} but the recipe has {recipe_key}="
                              f"{value}: remove {key} from the accelerate config (the recipe decides) or pass "
                              f"--{recipe_key}={ds_config[key]}")


def uses_cuda_graphs(cfg, device_type: str) -> bool:
    """The compiled step's forward and backward run as CUDA graphs: on a GPU, unless train.cuda_graphs=false."""
    return cfg.train.compile and cfg.train.cuda_graphs and device_type == "cuda"


def check_compiled_step(accelerator, cfg, sharded: bool) -> None:
    """What the compiled step (trainer/step.py) cannot do, refused in one line each."""
    if not cfg.train.compile:
        return
    if sharded:
        raise ConfigError(f"train.compile compiles the step for one device or DDP, not "
                          f"{accelerator.distributed_type.value}: drop --train.compile")
    if accelerator.mixed_precision == "fp16":
        raise ConfigError("train.compile's update does not unscale fp16 gradients (GradScaler): use "
                          "--train.mixed_precision=no (what auto picks for it on GPUs without bf16), or drop "
                          "--train.compile")
    if uses_cuda_graphs(cfg, accelerator.device.type) and cfg.data.mask_count != "fixed":
        raise ConfigError("train.compile with CUDA graphs needs one shape per step (Bernoulli masks give each "
                          "step its own mask count, a graph each): add --data.mask_count=fixed, or "
                          "--train.cuda_graphs=false")


def set_fsdp_mixed_precision(plugin, precision: str) -> None:
    """FSDP computes in `precision` but, like DDP, reduces gradients and returns its outputs in fp32.
    Accelerate's policy casts all three to `precision`: the root's output cast would round the fp32
    per-token loss to bf16, and gradients would be summed across ranks in bf16."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if plugin.fsdp_version == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32,
                                                             output_dtype=torch.float32)
    else:
        from torch.distributed.fsdp import MixedPrecision

        plugin.mixed_precision_policy = MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32,
                                                       buffer_dtype=torch.float32)


def resolve_mixed_precision(choice: str, compiled: bool = False) -> str:
    """'auto' -> bf16 where the hardware runs it natively (`fast_bf16`), else fp16 on a GPU (fp32 for a
    compiled step, whose update does not unscale fp16 gradients), fp32 on a CPU."""
    use_cuda = cuda_in_use()
    if choice == "fp16" and not use_cuda:
        raise ConfigError("train.mixed_precision=fp16 needs a CUDA GPU (Accelerate would silently train in fp32 "
                          "on CPU); use --train.mixed_precision=bf16 or no")
    if choice != "auto":
        return choice
    if fast_bf16("cuda" if use_cuda else "cpu"):
        return "bf16"
    return "fp16" if use_cuda and not compiled else "no"


FAST_BF16_ENV = "TRAINER_FAST_BF16"


def fast_bf16(device_type: str) -> bool:
    """Whether the device runs bf16 matmuls natively: a GPU of compute capability 8+ (V100/T4 report bf16
    "supported" but emulate it), a CPU with avx512_bf16 or AMX (without them a bf16 matmul is ~50x slower
    than fp32). The one rule behind `mixed_precision=auto` and Muon's Newton-Schulz precision.
    TRAINER_FAST_BF16=0 or 1 overrides the detection."""
    override = os.environ.get(FAST_BF16_ENV, "").strip().lower()
    if override:
        if override not in ("0", "1", "true", "false", "yes", "no"):
            raise ConfigError(f"{FAST_BF16_ENV}={override!r}: use 1 (bf16 is fast here) or 0 (compute in fp32)")
        return override in ("1", "true", "yes")
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_capability()[0] >= 8
    return device_type == "cpu" and cpu_has_fast_bf16()


def fast_matmul_dtype(device_type: str):
    """The low-precision dtype worth computing in on this device: bf16 where it is native, else fp32."""
    import torch

    return torch.bfloat16 if fast_bf16(device_type) else torch.float32


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def enable_tf32() -> None:
    """TF32 tensor cores for the fp32 matmuls that autocast leaves in fp32 (and for fp32 runs)."""
    import torch

    if cuda_in_use():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------- how the run was launched

LAUNCH_ENV = "TRAINER_LAUNCH_COMMAND"  # set by `python -m trainer.launch`: its command as typed, up to the script
LAUNCH_VARIABLES = ("ACCELERATE_USE_CPU", "TRAINER_ALLOW_CPU")  # set by the user, they change what a launch runs
LAUNCHER_SCRIPTS = ("accelerate", "torchrun", "deepspeed")


def shell_command(argv: list[str], environ: dict) -> str:
    """`argv` as a shell line, after the launch variables set in `environ`."""
    return " ".join([*(f"{k}={shlex.quote(environ[k])}" for k in LAUNCH_VARIABLES if k in environ), shlex.join(argv)])


@functools.cache
def launch_command() -> str:
    """This run's launch as the user typed it, up to and including the training script, for the resume
    command: `python -m trainer.launch` says it; `accelerate launch` (or torchrun) is this process's parent,
    whose command line ends with this process's arguments. Read at start, while the launcher is alive."""
    if os.environ.get(LAUNCH_ENV):
        return os.environ[LAUNCH_ENV]
    own = sys.argv
    if Path(own[0]).resolve() != Path(__file__).with_name("run.py").resolve():
        return "accelerate launch trainer/run.py"  # trained in-process (a test, a notebook)
    try:
        proc = Path(f"/proc/{os.getppid()}")
        parent = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        parent_env = dict(e.split("=", 1) for e in (proc / "environ").read_bytes().decode(errors="replace").split("\0")
                          if "=" in e)
    except OSError:
        parent, parent_env = [], {}
    if len(parent) > len(own) and parent[-len(own):] == own:
        launcher = parent[:len(parent) - len(own) + 1]
        if len(launcher) > 1 and Path(launcher[1]).name in LAUNCHER_SCRIPTS:  # `python .venv/bin/accelerate ...`
            launcher = [Path(launcher[1]).name, *launcher[2:]]
        return shell_command(launcher, parent_env)
    return shell_command(sys.orig_argv[:len(sys.orig_argv) - len(own) + 1], dict(os.environ))  # python trainer/run.py


# --------------------------------------------------------------------------- stop signals

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    """SIGTERM, SIGINT and SIGUSR1 set a flag; the loop finishes its step, checkpoints and exits with
    128 + the signal number. A second SIGTERM/SIGINT kills at once.

    `accelerate launch` runs a one-process job as a child and does not forward signals: a scheduler's
    SIGTERM kills the launcher only. The child asks the kernel for SIGUSR1 when its parent dies, and
    stops as if it had received SIGTERM (exit 143). SIGUSR1 never escalates: Ctrl-C reaches both
    processes, and the launcher's death that follows must not count as a second Ctrl-C.
    """

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self.exit_code = 0
        self.previous = {}
        self.parent = os.getppid()
        for sig in STOP_SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (e.g. a notebook helper thread): no handler
                pass
        if self.previous and sys.platform == "linux":
            try:
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGUSR1))
            except (OSError, AttributeError):
                pass

    def handle(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGUSR1 and os.getppid() != self.parent:
            name, code = "launcher exited", 128 + signal.SIGTERM
        else:
            name, code = sig.name, 128 + signum
        if sig != signal.SIGUSR1:  # a second SIGTERM or Ctrl-C kills at once
            for other in (signal.SIGTERM, signal.SIGINT):
                signal.signal(other, signal.SIG_DFL)
        if not self.requested:
            self.requested, self.signal_name, self.exit_code = True, name, code
            print(f"\n{name}: finishing the current step, then checkpointing (again to stop at once)",
                  file=sys.stderr, flush=True)

    def agreed(self, accelerator, at_log_step: bool) -> bool:
        """Whether to stop after this step. One process reads its own flag (no device work); several
        agree at logging steps (one all-reduce), so they all stop at the same step."""
        if accelerator.num_processes == 1:
            return self.requested
        if not at_log_step:
            return False
        import torch

        flag = accelerator.reduce(torch.tensor(float(self.requested), device=accelerator.device), reduction="max")
        if flag.item() and not self.requested:
            self.requested, self.signal_name, self.exit_code = True, "signal on another process", 128 + signal.SIGTERM
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if sys.platform == "linux" and self.previous:
            try:
                ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 0)
            except (OSError, AttributeError):
                pass


# torch 2.13's CUDA builds, newest first: (CUDA version the driver must support, pip index; None = PyPI's wheel).
TORCH_CUDA_BUILDS = (((13, 0), None), ((12, 8), "https://download.pytorch.org/whl/cu128"),
                     ((12, 6), "https://download.pytorch.org/whl/cu126"))


def torch_index_for_driver(nvidia_smi: str) -> str | None:
    """The pip index of the newest torch CUDA build that the driver runs, from `nvidia-smi`'s header
    ("CUDA Version: 12.8"): PyPI's wheel (None) needs a CUDA 13 driver. Runs under any python3 (the
    Makefile asks before the virtualenv exists): standard library only."""
    import re

    found = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", nvidia_smi)
    if not found:
        return None
    supported = (int(found[1]), int(found[2]))
    for needed, index in TORCH_CUDA_BUILDS:
        if supported >= needed:
            return index
    raise ConfigError(f"this NVIDIA driver supports CUDA {supported[0]}.{supported[1]}; torch 2.13 needs 12.6 or "
                      f"newer: update the driver")


if __name__ == "__main__":  # the Makefile's checks: `python -m trainer.runtime check-cuda | torch-index`
    if sys.argv[1:] == ["torch-index"]:  # prints the index for `pip install --index-url`, or nothing for PyPI's
        import subprocess

        try:
            print(torch_index_for_driver(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout) or "")
        except (OSError, ConfigError) as e:
            sys.exit(f"error: {e}")
        sys.exit(0)
    import torch

    if sys.argv[1:] == ["check-cuda"] and not torch.cuda.is_available():
        sys.exit(f"error: torch {torch.__version__} cannot use this machine's GPU (see `nvidia-smi`: its driver's "
                 f"CUDA version); reinstall the build it runs: rm -rf .venv && make install "
                 f"TORCH_INDEX=https://download.pytorch.org/whl/cu128 (or cu126)")
