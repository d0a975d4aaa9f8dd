"""Training data beyond JSON lines: tables, saved and hub datasets, columns and chats."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from peer.config import DataConfig, PeerConfig, TrainConfig
from peer.data import (
    Chat,
    TokenBatches,
    eval_batches,
    format_example,
    load_examples,
    render,
)
from tests.test_data import decode, jsonl, make_tokenizer, raises_one_line

CHAT = {"messages": [{"role": "user", "content": "the cat"},
                     {"role": "assistant", "content": "sat on a mat"}]}
CHAT_RECORD = Chat((("user", "the cat"), ("assistant", "sat on a mat")))


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict[str, list[Any]]) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def write_arrow(path: Path, columns: dict[str, list[Any]], stream: bool = True) -> Path:
    table = pa.table(columns)
    opener = pa.ipc.new_stream if stream else pa.ipc.new_file
    with opener(str(path), table.schema) as writer:
        writer.write_table(table)
    return path


# -- CSV ---------------------------------------------------------------------------------------


def test_csv_rows_are_read_as_text(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", 'instruction,input,output\n'
                     'Pad it.,007,0007\n"Split, then join.",NA,"two\nlines"\nSay hi.,,hi\n')
    assert load_examples(path) == [
        format_example("Pad it.", "0007", input="007"),
        format_example("Split, then join.", "two\nlines", input="NA"),
        format_example("Say hi.", "hi"),
    ]


def test_csv_text_column_and_blank_lines(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "id,text\n1,the cat sat\n\n2,dog ran\n")
    assert load_examples(path) == ["the cat sat", "dog ran"]


def test_csv_bad_row_names_file_and_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", "instruction,output\nSay hi.,hi\nSay bye.,\n")
    raises_one_line(lambda: load_examples(path), f"{path}: row 2: field 'output' is empty")


@pytest.mark.parametrize("content, fragment", [
    (b"", "empty file"),
    (b"text\n", "empty file"),
    (b"text\n\n  \n", "empty file"),
    (b"text,text\na,b\n", "repeats a column name (text, text)"),
    (b"text\ncaf\xe9\n", "not UTF-8"),
    (b'text,other\n"never closed,1\n', "cannot read as CSV"),
])
def test_csv_file_errors(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    raises_one_line(lambda: load_examples(path), str(path), fragment)


# -- Parquet and Arrow -------------------------------------------------------------------------


def test_parquet_text_instruction_and_chat_columns(tmp_path: Path) -> None:
    texts = write_parquet(tmp_path / "a.parquet", {"text": ["one", "two"], "n": [1, 2]})
    assert load_examples(texts) == ["one", "two"]
    tasks = write_parquet(tmp_path / "b.parquet", {"instruction": ["Say hi."], "output": ["hi"],
                                                   "input": [None]})
    assert load_examples(tasks) == [format_example("Say hi.", "hi")]
    chats = write_parquet(tmp_path / "c.parquet", {"messages": [CHAT["messages"]]})
    assert load_examples(chats) == [CHAT_RECORD]


def test_parquet_null_names_file_and_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"text": ["one", "two", None]})
    raises_one_line(lambda: load_examples(path), f"{path}: row 3: field 'text' is empty (null)")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "file"])
def test_arrow_stream_and_file_formats(tmp_path: Path, stream: bool) -> None:
    path = write_arrow(tmp_path / "d.arrow", {"text": ["one", "two"]}, stream=stream)
    assert load_examples(path) == ["one", "two"]


def test_arrow_bad_row_names_file_and_row(tmp_path: Path) -> None:
    path = write_arrow(tmp_path / "d.arrow", {"text": ["one", "two"], "x": [1, 2]})
    raises_one_line(lambda: load_examples(path, DataConfig(text_field="x")),
                    f"{path}: row 1: field 'x' must be a string, got int")


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_corrupt_table_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    path.write_bytes(b"not a table at all")
    raises_one_line(lambda: load_examples(path), str(path), f"cannot read as {suffix[1:].upper()}")


def test_empty_table_file(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"text": pa.array([], pa.string())})
    raises_one_line(lambda: load_examples(path), f"{path}: empty file")


def test_tables_leave_no_cache_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    bars = datasets.is_progress_bar_enabled()
    load_examples(write_parquet(tmp_path / "d.parquet", {"text": ["one"]}))
    assert list(temp.iterdir()) == []
    assert datasets.is_progress_bar_enabled() is bars


# -- saved datasets, folders and hub names -----------------------------------------------------


def test_saved_dataset_folder(tmp_path: Path) -> None:
    datasets.Dataset.from_list([{"text": "one"}, {"text": None}]).save_to_disk(
        tmp_path / "saved")
    raises_one_line(lambda: load_examples(tmp_path / "saved"),
                    f"{tmp_path / 'saved'}: row 2: field 'text' is empty (null)")
    datasets.Dataset.from_list([{"text": "one"}, {"text": "two"}]).save_to_disk(
        tmp_path / "good")
    assert load_examples(tmp_path / "good") == ["one", "two"]


def test_saved_dataset_dict_uses_its_train_split(tmp_path: Path) -> None:
    splits = {"train": datasets.Dataset.from_list([{"text": "train row"}]),
              "test": datasets.Dataset.from_list([{"text": "test row"}])}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "both")
    assert load_examples(tmp_path / "both") == ["train row"]
    datasets.DatasetDict({"test": splits["test"]}).save_to_disk(tmp_path / "test_only")
    raises_one_line(lambda: load_examples(tmp_path / "test_only"), "no 'train' split",
                    "(splits: test)")


def test_folder_mixes_every_format_in_name_order(tmp_path: Path) -> None:
    jsonl(tmp_path / "a.jsonl", {"text": "from a"})
    write_csv(tmp_path / "b.csv", "text\nfrom b\n")
    write_parquet(tmp_path / "c.parquet", {"text": ["from c"]})
    write_arrow(tmp_path / "d.arrow", {"text": ["from d"]})
    (tmp_path / "e.txt").write_text("from e", encoding="utf-8")
    jsonl(tmp_path / "f.jsonl", CHAT)
    write_csv(tmp_path / ".hidden.csv", "text\nignored\n")
    assert load_examples(tmp_path) == ["from a", "from b", "from c", "from d", "from e",
                                       CHAT_RECORD]


def test_bad_row_in_a_folder_names_its_file(tmp_path: Path) -> None:
    write_csv(tmp_path / "a.csv", "text\nfine\n")
    write_parquet(tmp_path / "b.parquet", {"body": ["typo"]})
    raises_one_line(lambda: load_examples(tmp_path), f"{tmp_path / 'b.parquet'}: row 1:",
                    "(found: body)")


def test_hub_name_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_examples went to the hub while offline")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raises_one_line(lambda: load_examples("someone/some-data"),
                    "someone/some-data: not a local file or folder, and the hub could not be "
                    "reached", "offline", "pass a local")


def test_hub_name_download_failure_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Couldn't reach 'someone/some-data' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    raises_one_line(lambda: load_examples("someone/some-data"), "hub could not be reached",
                    "Couldn't reach")


def test_hub_dataset_rows_are_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_hub(name: str, **kwargs: Any) -> datasets.Dataset:
        calls.append((name, kwargs.get("split")))
        return datasets.Dataset.from_list([{"body": "one"}, {"body": ""}])

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    raises_one_line(lambda: load_examples("someone/some-data", DataConfig(text_field="body")),
                    "someone/some-data: row 2: field 'body' is empty")
    assert calls == [("someone/some-data", "train")]


def test_missing_file_with_a_data_suffix_is_not_a_hub_name(tmp_path: Path) -> None:
    raises_one_line(lambda: load_examples("someone/data.csv"), "no such file or folder")


# -- column mapping ----------------------------------------------------------------------------


def test_custom_text_field_in_jsonl_and_tables(tmp_path: Path) -> None:
    fields = DataConfig(text_field="body")
    assert load_examples(jsonl(tmp_path / "a.jsonl", {"body": "x y", "text": "no"}),
                         fields) == ["x y"]
    assert load_examples(write_csv(tmp_path / "b.csv", "body\nz\n"), fields) == ["z"]


@pytest.mark.parametrize("names, row, expected", [
    (("prompt", "answer"), {"prompt": "Q?", "answer": "A", "input": "ignored"},
     format_example("Q?", "A")),
    (("q", "ctx", "a"), {"q": "Q?", "ctx": "C", "a": "A"}, format_example("Q?", "A", "C")),
    (("q", "ctx", "a"), {"q": "Q?", "a": "A"}, format_example("Q?", "A")),
])
def test_custom_instruction_fields(tmp_path: Path, names: tuple[str, ...], row: dict[str, str],
                                   expected: str) -> None:
    fields = DataConfig(instruction_fields=names)
    assert load_examples(jsonl(tmp_path / "a.jsonl", row), fields) == [expected]
    table = write_parquet(tmp_path / "a.parquet", {key: [value] for key, value in row.items()})
    assert load_examples(table, fields) == [expected]


def test_missing_columns_name_the_configured_fields_and_those_found(tmp_path: Path) -> None:
    fields = DataConfig(text_field="body", instruction_fields=("q", "a"))
    path = write_csv(tmp_path / "d.csv", "question,answer\nQ?,A\n")
    raises_one_line(lambda: load_examples(path, fields), f"{path}: row 1:",
                    "needs a 'body' field or 'q' and 'a' fields or a 'messages' list",
                    "(found: answer, question)")


# -- chat records ------------------------------------------------------------------------------


def test_chat_records_in_jsonl_and_csv(tmp_path: Path) -> None:
    assert load_examples(jsonl(tmp_path / "a.jsonl", CHAT)) == [CHAT_RECORD]
    cell = json.dumps(CHAT["messages"]).replace('"', '""')
    assert load_examples(write_csv(tmp_path / "b.csv", f'messages\n"{cell}"\n')) == [CHAT_RECORD]


def test_chat_as_a_dict_of_lists(tmp_path: Path) -> None:
    # datasets' Sequence({...}) feature stores a list of messages as a dict of lists.
    features = datasets.Features({"messages": datasets.Sequence(
        {"role": datasets.Value("string"), "content": datasets.Value("string")})})
    datasets.Dataset.from_dict(
        {"messages": [{"role": ["user", "assistant"], "content": ["the cat", "sat on a mat"]}]},
        features=features).save_to_disk(tmp_path / "saved")
    assert load_examples(tmp_path / "saved") == [CHAT_RECORD]


@pytest.mark.parametrize("messages, fragment", [
    ("not json", "field 'messages' is not a JSON list"),
    ({"role": "user"}, "must be a list of at least 2 messages"),
    ([{"role": "assistant", "content": "alone"}], "must be a list of at least 2 messages"),
    ([{"role": "user", "content": "hi"}, "yo"], "message 2 needs string 'role' and 'content'"),
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}],
     "message 1 needs string 'role' and 'content'"),
    ([{"role": "", "content": "hi"}, {"role": "assistant", "content": "x"}],
     "message 1 needs string"),
    ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}],
     "the last message must be the assistant's reply, got role 'user'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}],
     "the assistant's last reply is empty"),
])
def test_bad_chat_records_name_file_and_line(tmp_path: Path, messages: Any,
                                             fragment: str) -> None:
    path = jsonl(tmp_path / "a.jsonl", CHAT, {"messages": messages})
    raises_one_line(lambda: load_examples(path), f"{path}:2: ", fragment)


def test_chat_without_a_template_uses_role_lines() -> None:
    tokenizer = make_tokenizer()
    chat = Chat((("system", "be brief"), ("user", "the cat"), ("assistant", "sat on a mat")))
    assert render(chat, tokenizer) == (
        "system: be brief\nuser: the cat\nassistant: sat on a mat",
        "system: be brief\nuser: the cat\nassistant: ")
    batch = eval_batches([chat], tokenizer, seq_len=32, batch_size=1)[0]
    assert decode(tokenizer, batch["input_ids"][0], batch["labels"][0] != -100) == (
        "sat on a mat [EOS]")


def test_chat_with_the_builtin_models_template(small_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(small_model_dir)
    messages = [{"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}]
    chat = Chat(tuple((m["role"], m["content"]) for m in messages))
    text, prompt = render(chat, tokenizer)
    assert text == str(tokenizer.apply_chat_template(messages, tokenize=False)).rstrip()
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    assert text[len(prompt):] == "Blue.<|im_end|>"
    batch = eval_batches([chat], tokenizer, seq_len=128, batch_size=1)[0]
    targets = batch["input_ids"][0][batch["labels"][0] != -100]
    # The reply and its end-of-turn token (the EOS): nothing of the prompt, no second EOS.
    assert tokenizer.decode(targets) == "Blue.<|im_end|>"
    assert tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0] == 1]) == text


def test_chat_template_that_rejects_a_record_names_it(tmp_path: Path) -> None:
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    examples = load_examples(jsonl(tmp_path / "a.jsonl", {"text": "fine"}, CHAT))
    raises_one_line(lambda: TokenBatches(examples, tokenizer, seq_len=16, batch_size=1, seed=0),
                    f"{tmp_path / 'a.jsonl'}:2: the tokenizer's chat template rejects it",
                    "roles must alternate")


def test_peer_reads_its_columns_and_packs(tmp_path: Path, small_model_dir: Path) -> None:
    from peer.setup import build_runtime

    data = jsonl(tmp_path / "train.jsonl", {"body": "Plain text to learn."}, CHAT)
    config = PeerConfig(data_dir=tmp_path / "peer", train_path=data, eval_path=data,
                        model=str(small_model_dir), data=DataConfig(text_field="body", pack=True),
                        train=TrainConfig(batch_size=1, seq_len=128))
    runtime = build_runtime(config)
    batches = runtime.trainer.batches
    assert batches.pack and len(batches) == 2
    assert batches.next_batch()["input_ids"].shape[0] == 1 and batches.last_examples == 2
    # Held-out data is read the same way, never packed: two examples, two rows.
    assert sum(int(b["input_ids"].shape[0]) for b in runtime.eval_batches) == 2


def test_held_out_batches_do_not_follow_the_training_batch(tmp_path: Path,
                                                           small_model_dir: Path) -> None:
    from peer.setup import build_runtime

    texts = [{"text": f"Held-out example number {i}."} for i in range(7)]
    held_out = jsonl(tmp_path / "eval.jsonl", *texts)
    rows = []
    for batch_size in (1, 4):
        config = PeerConfig(data_dir=tmp_path / f"peer{batch_size}", train_path=held_out,
                            eval_path=held_out, model=str(small_model_dir), eval_batch_size=3,
                            train=TrainConfig(batch_size=batch_size, seq_len=32))
        rows.append([int(b["input_ids"].shape[0]) for b in build_runtime(config).eval_batches])
    assert rows == [[3, 3, 1], [3, 3, 1]]
