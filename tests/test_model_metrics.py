import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM, BertModel

from trainer.config import ModelConfig
from trainer.data import IndexedBlocks, MLMCollator, dense_labels, eval_collator
from trainer.evaluate import evaluate_mlm
from trainer.metrics import MLMTotals, perplexity
from trainer.model import (ModelError, SparseMLM, build_model, check_block_size, fast_dropout, sinusoids,
                           use_fast_dropout)


def tiny_bert(vocab=40, dropout=0.0, seed=0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForMaskedLM(config)


def test_perplexity_matches_a_hand_computation():
    # Two masked tokens, vocabulary of 3: CE_i = -log softmax(logits_i)[label_i].
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    labels = torch.tensor([0, 1])
    by_hand = [-(l[y] - math.log(sum(math.exp(v) for v in l))) for l, y in zip(logits.tolist(), labels.tolist())]
    totals = MLMTotals()
    totals.add(F.cross_entropy(logits, labels, reduction="none"), logits.argmax(-1) == labels)
    metrics = totals.compute("eval")
    assert metrics["eval/loss"] == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    assert metrics["eval/perplexity"] == pytest.approx(math.exp(sum(by_hand) / 2), rel=1e-6)
    assert metrics["eval/accuracy"] == 0.5 and metrics["eval/masked_tokens"] == 2


def test_perplexity_overflow_guard():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(800.0) == math.inf and perplexity(float("nan")) == math.inf


def test_sparse_head_equals_the_dense_hf_loss_and_gradients(tiny_tokenizer):
    model = tiny_bert(len(tiny_tokenizer))
    blocks = torch.randint(5, len(tiny_tokenizer), (4, 16), dtype=torch.int32)
    batch = MLMCollator(tiny_tokenizer)([(i, blocks[i]) for i in range(4)])

    dense = model(input_ids=batch["input_ids"], labels=dense_labels(batch)).loss
    dense.backward()
    dense_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    token_loss, _ = SparseMLM(model)(**batch)
    token_loss.mean().backward()
    assert token_loss.mean().item() == pytest.approx(dense.item(), abs=1e-6)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, dense_grads[name], atol=1e-6), name


def test_rows_grad_embedding_gives_the_tied_weight_the_same_dense_gradient(tiny_tokenizer, tmp_path):
    from trainer.model import RowsGradEmbedding, use_rows_grad_embedding

    model = tiny_bert(len(tiny_tokenizer))
    blocks = torch.randint(5, len(tiny_tokenizer), (4, 16), dtype=torch.int32)
    batch = MLMCollator(tiny_tokenizer)([(i, blocks[i]) for i in range(4)])
    grads = []
    for swap in (False, True):
        if swap:
            use_rows_grad_embedding(model)
        model.zero_grad(set_to_none=True)
        SparseMLM(model)(**batch)[0].mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    embeddings = model.get_input_embeddings()
    assert type(embeddings) is RowsGradEmbedding and model.get_output_embeddings().weight is embeddings.weight
    assert grads[1].keys() == grads[0].keys()
    for name, grad in grads[1].items():
        assert grad.layout == torch.strided and torch.allclose(grad, grads[0][name], atol=1e-7), name
    model.save_pretrained(tmp_path)  # saved as plain BERT
    assert type(BertForMaskedLM.from_pretrained(tmp_path).get_input_embeddings()) is torch.nn.Embedding


def test_evaluate_matches_a_hand_computation_with_the_dense_model(tiny_tokenizer):
    from accelerate import Accelerator

    model = tiny_bert(len(tiny_tokenizer)).eval()
    blocks = torch.randint(5, len(tiny_tokenizer), (5, 16), dtype=torch.int32)
    collator = eval_collator(tiny_tokenizer, 0.3)
    loader = torch.utils.data.DataLoader(IndexedBlocks(blocks), batch_size=2, collate_fn=collator)
    metrics = evaluate_mlm(SparseMLM(model), loader, Accelerator(cpu=True))

    # By hand: dense HF logits at every position, CE summed in float64 over labelled positions.
    batch = collator([(i, blocks[i]) for i in range(5)])
    labels = dense_labels(batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits.double()
    chosen = labels != -100
    log_probs = logits.log_softmax(-1)[chosen]
    targets = labels[chosen]
    ce = -log_probs[torch.arange(len(targets)), targets]
    assert metrics["eval/masked_tokens"] == len(targets)
    assert metrics["eval/loss"] == pytest.approx(ce.mean().item(), rel=1e-5)
    assert metrics["eval/perplexity"] == pytest.approx(math.exp(ce.mean().item()), rel=1e-5)
    assert metrics["eval/accuracy"] == pytest.approx((log_probs.argmax(-1) == targets).double().mean().item())


def test_scratch_model_size_and_vocab_check():
    model, report = build_model(ModelConfig(), vocab_size=30522)
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert 9.5e6 < n < 11e6 and report.new_weights == []
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # tied
    with pytest.raises(ModelError, match="exceeds the model's max_position_embeddings=512"):
        check_block_size(model, 1024)


def test_sinusoidal_position_init_saves_as_plain_bert(tmp_path):
    cfg = ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_position_embeddings=64,
                      init_std=0.05, sinusoidal_position_init=True)
    model, _ = build_model(cfg, vocab_size=40)
    table = model.bert.embeddings.position_embeddings.weight.detach()
    assert model.config.initializer_range == 0.05
    assert torch.allclose(table[:, 0], 0.05 * 2**0.5 * torch.sin(torch.arange(64.0)))  # fastest sinusoid
    assert torch.allclose(table[:, 1], 0.05 * 2**0.5 * torch.cos(torch.arange(64.0)))
    # Shift by k = a fixed rotation of each (sin, cos) pair: the same linear map at every position.
    shifted = sinusoids(64, 16)[5:] / 2**0.5
    angle = torch.tensor(5.0) * torch.exp(torch.arange(0, 16, 2) * (-math.log(1e4) / 16))
    first = sinusoids(64, 16)[:-5] / 2**0.5
    assert torch.allclose(shifted[:, 0::2], first[:, 0::2] * angle.cos() + first[:, 1::2] * angle.sin(), atol=1e-5)
    odd = sinusoids(64, 7) / 2**0.5  # odd width: four sines, three cosines
    position = torch.arange(64.0)
    assert torch.allclose(odd[:, 5], torch.cos(position * 1e4 ** (-4 / 7)), atol=1e-5)
    assert torch.allclose(odd[:, 6], torch.sin(position * 1e4 ** (-6 / 7)), atol=1e-5)
    model.save_pretrained(tmp_path / "m")
    reloaded = BertForMaskedLM.from_pretrained(tmp_path / "m")
    assert torch.equal(reloaded.bert.embeddings.position_embeddings.weight, table)
    random_init, _ = build_model(dataclasses.replace(cfg, sinusoidal_position_init=False), vocab_size=40)
    assert not torch.allclose(random_init.bert.embeddings.position_embeddings.weight, table)


def test_encoder_only_checkpoint_gets_a_new_tied_head(tmp_path):
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=32))
    encoder.save_pretrained(tmp_path / "enc")
    model, report = build_model(ModelConfig(pretrained=str(tmp_path / "enc")), vocab_size=40)
    assert any(w.startswith("cls.predictions.transform") for w in report.new_weights)
    assert not any(w.startswith("bert.encoder") for w in report.new_weights)
    assert any("pooler" in w for w in report.unused_weights)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, encoder.embeddings.word_embeddings.weight)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    with pytest.raises(ModelError, match="tokenizer has 50 tokens but the model's embeddings have 40 rows"):
        build_model(ModelConfig(pretrained=str(tmp_path / "enc")), vocab_size=50)
    with pytest.raises(ModelError, match="could not load model"):
        build_model(ModelConfig(pretrained=str(tmp_path / "nothing")), vocab_size=40)


def test_fast_dropout_keeps_the_dropout_distribution():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    y = fast_dropout(x, 0.1)
    assert (y == 0).float().mean().item() == pytest.approx(0.1, abs=0.003)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # inverted scaling keeps the expectation
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1 / 0.9)]


def test_fast_dropout_model_is_unchanged_in_eval_and_trains(tiny_tokenizer):
    plain = tiny_bert(len(tiny_tokenizer), dropout=0.1).eval()
    fast = tiny_bert(len(tiny_tokenizer), dropout=0.1).eval()
    use_fast_dropout(fast)
    ids = torch.randint(5, len(tiny_tokenizer), (2, 16))
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, fast(input_ids=ids).logits, atol=1e-5)
    fast.train()
    out1, out2 = fast(input_ids=ids).logits, fast(input_ids=ids).logits
    assert not torch.allclose(out1, out2)  # dropout is active in training
    out1.sum().backward()
    assert fast.bert.encoder.layer[0].attention.self.query.weight.grad is not None


def test_long_loops_show_progress_on_a_terminal_and_plain_lines_off_one(monkeypatch):
    import io

    from rich.console import Console

    from trainer import console as console_module
    from trainer.console import TrainingConsole

    terminal = TrainingConsole()
    terminal.interactive = True
    terminal.console = Console(file=io.StringIO(), force_terminal=True, width=100)
    assert list(terminal.track(range(5), 5, "eval")) == list(range(5))
    drawn = terminal.console.file.getvalue()
    assert "eval" in drawn and "5/5" in drawn and "━" in drawn  # a rich bar

    terminal.start(total_steps=10)  # during training: a second bar on the live display, then removed
    assert list(terminal.track(range(3), 3, "eval")) == [0, 1, 2] and len(terminal.progress.tasks) == 1
    terminal.close()

    monkeypatch.setattr(console_module, "PLAIN_PROGRESS_EVERY_S", 0.0)
    plain = TrainingConsole()
    plain.interactive = False
    plain.console = Console(file=io.StringIO(), width=100)
    assert list(plain.track(range(3), 3, "eval")) == [0, 1, 2]
    lines = plain.console.file.getvalue().splitlines()
    assert [line.split(" ", 1)[1].rsplit(" (", 1)[0] for line in lines] == ["eval 1/3", "eval 2/3", "eval 3/3"]


def test_the_schedule_reaches_both_optimizers_of_muon_after_prepare_and_resume():
    from accelerate import Accelerator

    from trainer.config import Config
    from trainer.step import build_optimizer, build_scheduler

    cfg = Config(model=ModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32))
    cfg.optim.name = "muon"
    model = SparseMLM(build_model(cfg.model, vocab_size=40)[0])
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    model, optimizer = Accelerator(cpu=True).prepare(model, optimizer)  # prepare reloads the state dict
    scheduler = build_scheduler(optimizer, cfg, total_steps=100)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    optimizer.load_state_dict(optimizer.state_dict())  # as a resume does
    scheduler.step()
    used = [group["lr"] for part in optimizer.optimizer.parts for group in part.param_groups]
    assert used == scheduler.get_last_lr() and used[-1] == pytest.approx(cfg.optim.muon_lr * 4 / 6)  # 6 warmup steps
