"""Training data: ids identical to inference, labels on exactly the answers and their terminators, both
JSON formats, truncation that never splits an image, skipped rows, cached URL images, modality batches."""

import dataclasses
import hashlib
import io
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from checkpoints import build_hf_model, processor_config, write_hf_checkpoint
from conftest import noise_image

from llavakit.config import IGNORE_INDEX
from llavakit.pipeline import load_processor
from llavakit.processing.conversation import add_image_tags, get_template, render
from llavakit.processing.media import FetchPolicy
from llavakit.processing.prompt import PromptProcessor
from llavakit.train.data import (
    BadSample,
    LlavaDataset,
    ModalityGroupedBatches,
    Sample,
    Skipped,
    collate,
    load_records,
    parse_record,
    tokenize_sample,
)

TWO_TURNS = [{"role": "user", "content": "What is shown?"}, {"role": "assistant", "content": "A cat."},
             {"role": "user", "content": "What color is it?"}, {"role": "assistant", "content": "Black."}]
CAPTION = [{"role": "user", "content": "Describe the image briefly."},
           {"role": "assistant", "content": "A cat on a mat."}]
# template -> the supervised text, one string per contiguous run of learned tokens (SPEC §5: the
# separator / EOS written after each answer is learned; for vicuna "</s>" is the EOS token itself).
LEARNED = {
    "vicuna_v1": ["A cat.</s>", "Black.</s>"],
    "llava_v1": ["A cat.</s>", "Black.</s>"],
    "mistral_instruct": ["A cat. </s>", "Black. </s>"],
    "llava_llama_2": ["A cat. </s>", "Black. </s>"],
    "chatml_direct": ["A cat.<|im_end|>", "Black.<|im_end|>"],
    "plain": ["A cat on a mat.\n"],
    "llava_v0": ["A cat.###", "Black.###"],
}


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    write_hf_checkpoint(build_hf_model("llava"), directory, "hub",
                        processor=processor_config("LlavaImageProcessor", do_pad=True))
    return load_processor(directory)


def with_tokens(processor, tokens, **cfg):
    """A processor whose tokenizer has extra special tokens (ChatML, <im_start>/<im_end>)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(processor.cfg.name_or_path)
    tok.add_tokens(list(tokens), special_tokens=True)
    return PromptProcessor(dataclasses.replace(processor.cfg, **cfg), tok, processor.template)


def runs(ids, labels):
    """Contiguous runs of learned token ids."""
    out, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            out, current = out + [current], []
    return out + [current] if current else out


@pytest.mark.parametrize("name", sorted(LEARNED))
def test_ids_match_inference_and_labels_cover_answers(processor, name):
    if name == "chatml_direct":
        processor = with_tokens(processor, ("<|im_start|>", "<|im_end|>"))
    template = get_template(name)
    messages = CAPTION if name == "plain" else TWO_TURNS
    images = processor.prepare_images([noise_image(40, 30)])
    sample = Sample("s", "x.png", messages)
    ids, labels, kept = tokenize_sample(processor, sample, template, images, max_length=4096)
    text = render(template, add_image_tags(messages, 1), add_generation_prompt=False)
    assert ids == processor.tokenize(text, images) and kept == 1
    assert [labels[i] for i, t in enumerate(ids) if t == processor.cfg.image_token_id] == [IGNORE_INDEX] * 4
    decoded = [processor.tokenizer.decode(r, skip_special_tokens=False) for r in runs(ids, labels)]
    assert decoded == LEARNED[name]


def test_vicuna_answers_end_with_the_eos_token(processor):
    ids, labels, _ = tokenize_sample(processor, Sample("s", None, TWO_TURNS), get_template("vicuna_v1"), [], 4096)
    assert [r[-1] for r in runs(ids, labels)] == [2, 2]
    assert ids[0] == 1 and labels[0] == IGNORE_INDEX


def test_im_start_end_wraps_and_truncates_before_im_start(processor):
    proc = with_tokens(processor, ("<im_start>", "<im_end>"), use_im_start_end=True)
    template = get_template("vicuna_v1")
    images = proc.prepare_images([noise_image(40, 30)])
    messages = TWO_TURNS[:2] + [{"role": "user", "content": "<image>\nWhat color is it?"}, TWO_TURNS[3]]
    sample = Sample("s", "x.png", messages)
    ids, labels, kept = tokenize_sample(proc, sample, template, images, 4096)
    assert ids == proc.tokenize(render(template, messages, add_generation_prompt=False), images) and kept == 1
    start = ids.index(proc.cfg.image_token_id)
    im_start, im_end = proc.tokenizer.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    assert ids[start - 1] == im_start and ids[start + 4] == im_end
    assert labels[start - 1:start + 5] == [IGNORE_INDEX] * 6
    assert [proc.tokenizer.decode(r, skip_special_tokens=False) for r in runs(ids, labels)] == LEARNED["vicuna_v1"]
    cut_ids, cut_labels, kept = tokenize_sample(proc, sample, template, images, start + 4)  # <im_end> cut off
    assert kept == 0 and cut_ids == ids[:start - 1] and cut_labels == labels[:start - 1]


def test_truncation_never_keeps_part_of_an_image(processor):
    template = get_template("vicuna_v1")
    images = processor.prepare_images([noise_image(40, 30)])
    messages = TWO_TURNS[:2] + [{"role": "user", "content": "<image>\nWhat color is it?"}, TWO_TURNS[3]]
    sample = Sample("s", "x.png", messages)
    ids, labels, _ = tokenize_sample(processor, sample, template, images, 4096)
    start = ids.index(processor.cfg.image_token_id)
    for max_length in (start + 1, start + 2, start + 3):  # inside the 4-token run
        cut_ids, cut_labels, kept = tokenize_sample(processor, sample, template, images, max_length)
        assert (cut_ids, cut_labels, kept) == (ids[:start], labels[:start], 0)
    cut_ids, cut_labels, kept = tokenize_sample(processor, sample, template, images, start + 4)
    assert kept == 1 and cut_ids == ids[:start + 4]
    first_answer = runs(cut_ids, cut_labels)[0]  # still learned
    assert processor.tokenizer.decode(first_answer, skip_special_tokens=False) == "A cat.</s>"


def test_truncation_keeps_the_images_before_the_cut(processor):
    template = get_template("vicuna_v1")
    images = processor.prepare_images([noise_image(40, 30), noise_image(30, 40, seed=1)])
    messages = [{"role": "user", "content": "<image>\nWhat is shown?"}, TWO_TURNS[1],
                {"role": "user", "content": "<image>\nAnd here?"}, TWO_TURNS[3]]
    sample = Sample("s", ["a.png", "b.png"], messages)
    ids, labels, kept = tokenize_sample(processor, sample, template, images, 4096)
    assert kept == 2 and ids == processor.tokenize(render(template, messages, add_generation_prompt=False), images)
    second = [i for i, t in enumerate(ids) if t == processor.cfg.image_token_id][4]
    assert tokenize_sample(processor, sample, template, images, second + 2) == (ids[:second], labels[:second], 1)
    assert tokenize_sample(processor, sample, template, images, second + 4)[2] == 2
    with pytest.raises(BadSample, match="2 <image> tags but 1 images"):
        tokenize_sample(processor, sample, template, images[:1], 4096)


def test_no_answer_within_max_length_is_bad(processor):
    with pytest.raises(BadSample, match="no answer tokens within model_max_length 20"):
        tokenize_sample(processor, Sample("s", None, TWO_TURNS), get_template("vicuna_v1"), [], 20)


def test_both_json_formats_parse_to_the_same_sample():
    llava = {"id": "7", "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nQ1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}
    paddle = {"id": "7", "image": "a.jpg", "conversations": [["<image>\nQ1", "A1"], ["Q2", "A2"]]}
    expected = Sample("7", "a.jpg", [{"role": "user", "content": "<image>\nQ1"},
                                     {"role": "assistant", "content": "A1"},
                                     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}])
    assert parse_record(llava, 0) == expected == parse_record(paddle, 0)
    roles = {"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "Q"},
                               {"from": "assistant", "value": "A"}]}
    assert parse_record(roles, 3) == Sample("3", None, [{"role": "system", "content": "S"},
                                                        {"role": "user", "content": "Q"},
                                                        {"role": "assistant", "content": "A"}])


@pytest.mark.parametrize("row, match", [
    ({"id": "x"}, "row 5 \\(id 'x'\\): no conversations"),
    ({"conversations": []}, "row 5 \\(id '5'\\): no conversations"),
    ({"conversations": [{"from": "gpt", "value": "A"}]}, "turn 0 is 'assistant' where 'user'"),
    ({"conversations": [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q"}]}, "turn 1 is 'user'"),
    ({"conversations": [["Q", "  "]]}, "assistant turn 1 is empty"),
    ({"conversations": [["Q", 3]]}, "turn 1 value is int, not a string"),
    ({"conversations": [["Q"]]}, "pair 0 has 1 items"),
    ({"conversations": [{"from": "bot", "value": "A"}]}, "unknown role 'bot'"),
    ({"conversations": [["Q", "A"], {"from": "human", "value": "Q"}]}, "must end with an assistant answer"),
    ({"image": 5, "conversations": [["Q", "A"]]}, "'image' must be"),
])
def test_malformed_rows_name_the_row(row, match):
    with pytest.raises(BadSample, match=match):
        parse_record(row, 5)


def test_load_records(tmp_path):
    rows = [{"id": "a", "conversations": [["Q", "A"]]}, {"id": "b", "conversations": [["Q", "A"]]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_records(tmp_path / "d.json") == rows == load_records(tmp_path / "d.jsonl")
    (tmp_path / "bad.json").write_text('[{"id": 1},')
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_records(tmp_path / "bad.json")
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 is not valid JSON"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "object.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match="object.json holds a JSON object; expected LLaVA training data"):
        load_records(tmp_path / "object.json")


ROW = {"id": "fr", "conversations": [["Qu'est-ce que c'est ?", "Un élève."]]}


@pytest.mark.parametrize("name, data, message", [
    ("latin1.json", json.dumps([ROW], ensure_ascii=False, indent=1).encode("latin-1"),
     "not UTF-8 text (byte 0xe9 at line 7, column 9); save it as UTF-8 (expected LLaVA training data"),
    ("latin1.jsonl", (json.dumps(ROW) + "\n" + json.dumps(ROW, ensure_ascii=False)).encode("latin-1"),
     "not UTF-8 text (byte 0xe9 at line 2, column 62); save it as UTF-8"),
    ("utf16.json", json.dumps([ROW]).encode("utf-16"),
     "not UTF-8 text (UTF-16: it starts with a UTF-16 byte-order mark); save it as UTF-8"),
])
def test_data_in_another_encoding_is_one_line_naming_the_file(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError) as e:
        load_records(tmp_path / name)
    assert str(e.value).startswith(f"{tmp_path / name}: {message}") and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["d.json", "d.jsonl"])
def test_utf8_data_with_a_byte_order_mark_loads(tmp_path, name):
    text = json.dumps(ROW, ensure_ascii=False) if name.endswith("l") else json.dumps([ROW], ensure_ascii=False)
    (tmp_path / name).write_text(text, encoding="utf-8-sig")
    assert load_records(tmp_path / name) == [ROW]


def test_a_bad_row_read_from_a_file_names_the_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps(ROW) + "\n\n" + json.dumps({"id": "x", "conversations": []}))
    rows = load_records(tmp_path / "d.jsonl")
    with pytest.raises(BadSample, match=rf"^{re.escape(str(tmp_path / 'd.jsonl'))}:3 \(id 'x'\): no conversations"):
        parse_record(rows[1], 1)


def png_bytes(seed=0):
    buf = io.BytesIO()
    noise_image(40, 30, seed).save(buf, format="PNG")
    return buf.getvalue()


def test_dataset_skips_bad_rows_and_collate_reports_them(processor, tmp_path):
    (tmp_path / "good.png").write_bytes(png_bytes())
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    qa = [["What is shown?", "A cat."]]
    records = [{"id": "good", "image": "good.png", "conversations": qa},
               {"id": "missing", "image": "missing.png", "conversations": qa},
               {"id": "corrupt", "image": "corrupt.png", "conversations": qa},
               {"id": "text", "conversations": qa + [["And?", "Nothing more to say here."]]},
               {"id": "bad", "conversations": [["Q", ""]]}]
    ds = LlavaDataset(records, processor, get_template("vicuna_v1"), tmp_path, 4096)
    items = [ds[i] for i in range(len(ds))]
    assert isinstance(items[1], Skipped) and "missing.png" in items[1].reason
    assert isinstance(items[2], Skipped) and items[2].reason.startswith("image 'corrupt.png': ")
    assert not any(word in items[i].reason for i in (1, 2, 4) for word in ("Error", "BadSample"))  # user terms
    assert isinstance(items[4], Skipped) and "assistant turn 1 is empty" in items[4].reason
    assert [ds.modality(i) for i in range(5)] == ["image", "image", "image", "text", "text"]
    assert ds.length(0) == 5 + 128 and ds.length(3) == 11
    batch = ds.collate(items)
    assert [s.index for s in batch["skipped"]] == [1, 2, 4] and batch["indices"] == [0, 3]
    good, text = items[0], items[3]
    assert batch["input_ids"].shape == (2, max(len(good["input_ids"]), len(text["input_ids"])))
    assert len(good["input_ids"]) < len(text["input_ids"])  # so row 0 is right-padded
    n = len(good["input_ids"])
    assert torch.equal(batch["input_ids"][0, :n], good["input_ids"]) and (batch["input_ids"][0, n:] == 32001).all()
    assert torch.equal(batch["labels"][0, :n], good["labels"]) and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert len(batch["pixel_values"]) == 1 and batch["pixel_values"][0].shape == (1, 3, 28, 28)
    assert batch["image_sizes"] == [(30, 40)]
    assert batch["num_tokens"] == sum(int((x["labels"] != IGNORE_INDEX).sum()) for x in (good, text))
    assert collate([Skipped(0, "x")])["input_ids"].shape == (0, 0)


def test_url_image_is_fetched_once_then_cached(processor, tmp_path):
    hits, body = [], png_bytes(1)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/img.png"
        records = [{"image": url, "conversations": [["What is shown?", "A cat."]]}]
        ds = LlavaDataset(records, processor, get_template("vicuna_v1"), None, 4096, tmp_path / "cache",
                          FetchPolicy(allow_private_networks=True))
        first, second = ds[0], ds[0]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert hits == ["/img.png"]
    assert (tmp_path / "cache" / hashlib.sha256(url.encode()).hexdigest()).read_bytes() == body
    torch.testing.assert_close(first["pixel_values"][0], second["pixel_values"][0])
    assert torch.equal(first["input_ids"], second["input_ids"])


def test_modality_grouped_batches():
    modality = ["image" if i % 3 else "text" for i in range(50)]
    sampler = ModalityGroupedBatches(50, modality, 4, seed=1, group_by_modality=True)
    epoch0 = sampler.batches(0)
    assert all(len({modality[i] for i in b}) == 1 for b in epoch0)
    assert sorted(i for b in epoch0 for i in b) == list(range(50))
    assert epoch0 == ModalityGroupedBatches(50, modality, 4, seed=1, group_by_modality=True).batches(0)
    assert sampler.batches(1) != epoch0 and sorted(i for b in sampler.batches(1) for i in b) == list(range(50))
    assert ModalityGroupedBatches(50, modality, 4, seed=2, group_by_modality=True).batches(0) != epoch0
    mixed = ModalityGroupedBatches(50, modality, 4, seed=1, group_by_modality=False).batches(0)
    assert sorted(i for b in mixed for i in b) == list(range(50))
    assert any(len({modality[i] for i in b}) == 2 for b in mixed)
    dropped = ModalityGroupedBatches(50, modality, 4, seed=1, group_by_modality=True, drop_last=True).batches(0)
    assert all(len(b) == 4 for b in dropped) and len(dropped) == 33 // 4 + 17 // 4
