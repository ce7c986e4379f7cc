import pytest
import torch

from conftest import write_corpus
from trainer.config import DataConfig
from trainer.data import DataError, IndexedBlocks, MLMCollator, dense_labels, eval_collator, load_blocks


def load(cfg, tokenizer, split="train"):
    return load_blocks(cfg, tokenizer, split, log=lambda *_: None)


def test_blank_lines_are_dropped_and_unk_mapped(tmp_path, tiny_tokenizer):
    (tmp_path / "notes.txt").write_text("\n \n \t \n = Title = \na <unk> word\n\n")
    split = load(DataConfig(dataset=str(tmp_path / "notes.txt"), block_size=8, validation_split=0.0,
                            cache_dir=str(tmp_path / "c")), tiny_tokenizer)
    assert split.records == 6 and split.documents == 2
    tokens = split.blocks.tensor().flatten().tolist()
    assert tiny_tokenizer.unk_token_id in tokens  # <unk> became [UNK]


def test_blocks_are_the_concatenated_token_stream(tmp_path, tiny_tokenizer):
    lines = ["the cat sees a dog .", "the big river", "a king"]
    (tmp_path / "t.txt").write_text("\n".join(lines) + "\n")
    blocks = load(DataConfig(dataset=str(tmp_path / "t.txt"), block_size=4, validation_split=0.0,
                             cache_dir=str(tmp_path / "c")), tiny_tokenizer).blocks
    stream = [t for text in lines for t in tiny_tokenizer(text)["input_ids"]]  # [CLS] ... [SEP] per line
    expected = [stream[i:i + 4] for i in range(0, len(stream) // 4 * 4, 4)]
    assert blocks.tensor().tolist() == expected and blocks.tensor().dtype == torch.int32
    assert stream[0] == tiny_tokenizer.cls_token_id and tiny_tokenizer.sep_token_id in stream


def test_load_blocks_counts_lines_and_reads_tokens_files(tmp_path, tiny_tokenizer):
    corpus = write_corpus(tmp_path / "tok", suffix=".tokens")
    text = (corpus / "wiki.train.tokens").read_text().replace(" dog ", " <unk> ", 1)
    (corpus / "wiki.train.tokens").write_text(text)
    split = load(DataConfig(dataset=str(corpus), block_size=16, cache_dir=str(tmp_path / "c")), tiny_tokenizer)
    assert split.records == text.count("\n") and split.documents == sum(1 for l in text.splitlines() if l.strip())
    assert split.blocks.tensor().shape[1] == 16 and isinstance(split.blocks[0], torch.Tensor)
    assert (split.blocks.tensor() == tiny_tokenizer.unk_token_id).any()  # <unk> became [UNK]
    validation = load(DataConfig(dataset=str(corpus), block_size=16, cache_dir=str(tmp_path / "c")), tiny_tokenizer,
                      "validation")
    assert validation.records == (corpus / "wiki.valid.tokens").read_text().count("\n")  # the directory's own split


def test_missing_and_empty_data_are_clear_errors(tmp_path, tiny_tokenizer):
    cfg = DataConfig(dataset=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="data not found: .*nowhere"):
        load_blocks(cfg, tiny_tokenizer, "train")
    (tmp_path / "only_valid").mkdir()
    (tmp_path / "only_valid" / "wiki.valid.raw").write_text("x\n")
    with pytest.raises(DataError, match=r"no train split in .*only_valid: .* point --data.train_dataset"):
        load_blocks(DataConfig(dataset=str(tmp_path / "only_valid")), tiny_tokenizer, "train")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "wiki.train.raw").write_text(" \n\n \n")
    with pytest.raises(DataError, match="has no text"):
        load_blocks(DataConfig(dataset=str(tmp_path / "blank"), cache_dir=str(tmp_path / "c")), tiny_tokenizer, "train")


def test_hub_dataset_offline_is_a_clear_error(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="Offline\\? Pass local files: --data.dataset=DIR"):
        load_blocks(DataConfig(dataset="no-such-dataset-anywhere"), tiny_tokenizer, "train")


def batch_of(collator, blocks, indices):
    return collator([(i, blocks[i]) for i in indices])


def test_masking_statistics(tiny_tokenizer):
    torch.manual_seed(0)
    vocab = len(tiny_tokenizer)
    blocks = torch.randint(5, vocab, (400, 64), dtype=torch.int32)
    blocks[:, 0], blocks[:, 33] = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id
    collator = MLMCollator(tiny_tokenizer, probability=0.15, seed=1)
    batch = batch_of(collator, blocks, range(400))
    original = blocks.long().flatten()
    positions = batch["mlm_positions"]
    assert torch.equal(batch["mlm_labels"], original[positions])
    special = torch.isin(original, torch.tensor(tiny_tokenizer.all_special_ids))
    assert not special[positions].any()  # [CLS]/[SEP] are never predicted
    rate = len(positions) / (~special).sum().item()
    assert 0.14 < rate < 0.16
    inputs = batch["input_ids"].flatten()[positions]
    masked = (inputs == tiny_tokenizer.mask_token_id).float().mean().item()
    unchanged = (inputs == original[positions]).float().mean().item()
    assert 0.77 < masked < 0.83
    assert 0.08 < unchanged < 0.13  # 10% kept, plus the rare random draw of the original token
    untouched = torch.ones_like(original, dtype=torch.bool)
    untouched[positions] = False
    assert torch.equal(batch["input_ids"].flatten()[untouched], original[untouched])


def test_masks_are_keyed_on_sample_not_batch(tiny_tokenizer):
    blocks = torch.randint(5, len(tiny_tokenizer), (16, 32), dtype=torch.int32)
    collator = MLMCollator(tiny_tokenizer, seed=3)
    whole = batch_of(collator, blocks, range(8))
    halves = [batch_of(collator, blocks, range(0, 4)), batch_of(collator, blocks, range(4, 8))]
    assert torch.equal(whole["input_ids"], torch.cat([h["input_ids"] for h in halves]))
    assert torch.equal(dense_labels(whole), torch.cat([dense_labels(h) for h in halves]))
    collator.set_epoch(1)
    assert not torch.equal(batch_of(collator, blocks, range(8))["input_ids"], whole["input_ids"])  # dynamic


def test_eval_masks_are_fixed(tiny_tokenizer):
    blocks = torch.randint(5, len(tiny_tokenizer), (16, 32), dtype=torch.int32)
    first = batch_of(eval_collator(tiny_tokenizer, 0.15), blocks, range(16))
    again = batch_of(eval_collator(tiny_tokenizer, 0.15), blocks, range(16))
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["mlm_positions"], again["mlm_positions"])


def test_indexed_blocks_work_with_a_dataloader(tiny_tokenizer):
    blocks = torch.randint(5, len(tiny_tokenizer), (10, 8), dtype=torch.int32)
    loader = torch.utils.data.DataLoader(IndexedBlocks(blocks), batch_size=4, collate_fn=MLMCollator(tiny_tokenizer))
    shapes = [b["input_ids"].shape for b in loader]
    assert shapes == [(4, 8), (4, 8), (2, 8)]


def test_fixed_mask_count_gives_one_shape(tiny_tokenizer):
    torch.manual_seed(0)
    blocks = torch.randint(5, len(tiny_tokenizer), (64, 40), dtype=torch.int32)
    blocks[:, 0], blocks[:, 20] = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id
    blocks[0, 2:] = tiny_tokenizer.pad_token_id  # a block with one maskable token: the rest is padding rows
    collator = MLMCollator(tiny_tokenizer, probability=0.15, seed=1, fixed_count=True)
    shapes = set()
    for epoch in range(3):
        collator.set_epoch(epoch)
        for start in (0, 32):
            batch = batch_of(collator, blocks, range(start, start + 32))
            shapes.add(tuple(batch["mlm_positions"].shape))
    assert shapes == {(32 * 6,)}  # round(0.15 x 40) = 6 per block, every batch
    batch = batch_of(collator, blocks, range(32))
    labels, positions = batch["mlm_labels"].view(32, 6), batch["mlm_positions"].view(32, 6)
    assert (labels[0] >= 0).sum() == 1 and (labels[1:] >= 0).all()  # the short block pads with ignored rows
    rows = positions // 40
    assert torch.equal(rows, torch.arange(32)[:, None].expand(32, 6))  # each block's own positions
    original = blocks[:32].long().flatten()
    valid = batch["mlm_labels"] >= 0
    assert torch.equal(batch["mlm_labels"][valid], original[batch["mlm_positions"][valid]])
    assert not torch.isin(original[batch["mlm_positions"][valid]], torch.tensor(tiny_tokenizer.all_special_ids)).any()
