"""Image inputs: ``image_column`` values as content parts after the text, against the fake server
(no vision model can be built here quickly: see the README), asserting on the parts it received.
Also streaming: ``IterableDataset.map`` gives the same columns and errors as ``Dataset.map``."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conformance import check_request
from conftest import CHAT, write_recipe
from datasets import Dataset, Features, Image, List, Value
from fake_server import FakeServer
from PIL import Image as PILImage

from vllm_generator import RecipeError, vllm_generate
from vllm_generator.recipe import load_recipe
from vllm_generator.run import run_recipe


def png(colour: str = "red") -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (4, 4), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def generate(url: str, **kwargs: Any) -> Any:
    return vllm_generate(url, max_attempts=2, initial_wait=0.01, max_wait=0.05, **kwargs)


def sent_parts(server: FakeServer) -> list[list[dict[str, Any]]]:
    """The user message's content of every request, in the order of the rows' prompts."""
    bodies = [e["body"] for e in server.log()]
    for body in bodies:
        check_request(CHAT, body)
    bodies.sort(key=lambda b: b["messages"][-1]["content"][0]["text"])
    return [b["messages"][-1]["content"] for b in bodies]


def test_every_input_form_becomes_an_image_url_part_after_the_text(tmp_path: Path, fake_server: FakeServer) -> None:
    jpeg = io.BytesIO()
    PILImage.new("RGB", (4, 4), "blue").save(jpeg, format="JPEG")
    (tmp_path / "a.jpg").write_bytes(jpeg.getvalue())
    values = [
        str(tmp_path / "a.jpg"),  # a local file: inline
        "https://example.org/cat.png",  # a URL: as it is
        data_url(png()),  # a data URL: as it is
    ]
    ds = Dataset.from_dict({"prompt": ["q0", "q1", "q2"], "image": values})
    out = ds.map(generate(fake_server.url, image_column="image"), batched=True)
    assert out["error"] == [None] * 3
    assert out["response"] == ["echo: q0 [images: 1]", "echo: q1 [images: 1]", "echo: q2 [images: 1]"]
    parts = sent_parts(fake_server)
    assert parts[0] == [
        {"type": "text", "text": "q0"},
        {"type": "image_url", "image_url": {"url": data_url(jpeg.getvalue(), "image/jpeg")}},
    ]
    assert parts[1][1] == {"type": "image_url", "image_url": {"url": "https://example.org/cat.png"}}
    assert parts[2][1]["image_url"]["url"] == values[2]


@pytest.mark.parametrize("decode", [True, False], ids=["pil", "bytes-path"])
def test_a_datasets_image_column_is_sent_inline(tmp_path: Path, fake_server: FakeServer, decode: bool) -> None:
    ds = Dataset.from_dict({"prompt": ["q0", "q1"], "image": [{"bytes": png("red"), "path": None}, {"bytes": png("green"), "path": None}]})
    ds = ds.cast_column("image", Image(decode=decode))
    out = ds.map(generate(fake_server.url, image_column="image"), batched=True)
    assert out["error"] == [None, None]
    urls = [p[1]["image_url"]["url"] for p in sent_parts(fake_server)]
    # decoded to PIL and sent as PNG, or undecoded and sent with its own bytes: the same pixels here
    decoded = [PILImage.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB").getpixel((0, 0)) for u in urls]
    assert decoded == [(255, 0, 0), (0, 128, 0)]
    assert all(u.startswith("data:image/png;base64,") for u in urls)


def test_several_images_per_row_and_several_columns_keep_their_order(fake_server: FakeServer) -> None:
    ds = Dataset.from_dict(
        {
            "prompt": ["q0", "q1"],
            "pages": [["https://x/1.png", "https://x/2.png"], []],
            "cover": ["https://x/c0.png", "https://x/c1.png"],
        }
    )
    out = ds.map(generate(fake_server.url, image_column=["pages", "cover"]), batched=True)
    assert out["response"] == ["echo: q0 [images: 3]", "echo: q1 [images: 1]"]
    urls = [[p["image_url"]["url"] for p in parts[1:]] for parts in sent_parts(fake_server)]
    assert urls == [["https://x/1.png", "https://x/2.png", "https://x/c0.png"], ["https://x/c1.png"]]


def test_an_unreadable_image_is_that_rows_error_and_is_not_sent(tmp_path: Path, fake_server: FakeServer) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    ds = Dataset.from_dict(
        {"prompt": ["q0", "q1", "q2", "q3"], "image": ["https://x/ok.png", str(tmp_path / "gone.png"), str(tmp_path / "notes.txt"), None]}
    )
    out = ds.map(generate(fake_server.url, image_column="image"), batched=True)
    assert out["error"] == [
        None,
        f"not sent: image column 'image': cannot read image file {tmp_path / 'gone.png'} (No such file or directory)",
        f"not sent: image column 'image': file {tmp_path / 'notes.txt'} is not a PNG, JPEG, GIF, WebP or BMP image",
        "not sent: image column 'image': the image is null",
    ]
    assert out["response"] == ["echo: q0 [images: 1]", None, None, None]
    assert [p[0]["text"] for p in sent_parts(fake_server)] == ["q0"]


def test_the_runner_sends_images_and_counts_their_errors(tmp_path: Path, fake_server: FakeServer) -> None:
    images = [{"bytes": png(), "path": None}] * 3 + [{"bytes": b"junk", "path": None}]
    features = Features({"id": Value("int64"), "question": Value("string"), "image": Image()})
    Dataset.from_dict({"id": [0, 1, 2, 3], "question": ["q0", "q1", "q2", "q3"], "image": images}, features=features).to_parquet(
        tmp_path / "in.parquet"
    )
    recipe = write_recipe(
        tmp_path, fake_server.url, tmp_path / "in.parquet", tmp_path / "out" / "a.parquet", data={"image_column": "image"}
    )
    summary = run_recipe(load_recipe(recipe), progress=False)
    assert (summary.failed, summary.failed_by_type) == (1, {"image": 1})
    rows = pq.read_table(tmp_path / "out" / "a.parquet").to_pylist()
    assert [r["response"] for r in rows] == ["echo: q0 [images: 1]", "echo: q1 [images: 1]", "echo: q2 [images: 1]", None]
    assert rows[3]["error"] == "not sent: image column 'image': 4 bytes is not a PNG, JPEG, GIF, WebP or BMP image"
    assert len(fake_server.log()) == 3


def test_messages_with_image_parts_pass_through(fake_server: FakeServer) -> None:
    messages = [
        [{"role": "user", "content": [{"type": "text", "text": "q0"}, {"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}],
    ]
    ds = Dataset.from_dict({"messages": messages})
    # Arrow gives every part every field: {"type": "text", "text": "q0", "image_url": None}
    assert ds[0]["messages"][0]["content"][0]["image_url"] is None
    out = ds.map(generate(fake_server.url, messages_column="messages"), batched=True)
    assert out["response"] == ["echo: q0 [images: 1]"]
    (entry,) = fake_server.log()
    check_request(CHAT, entry["body"])
    assert entry["body"]["messages"] == messages[0]


def test_image_column_is_refused_where_it_cannot_apply(fake_server: FakeServer) -> None:
    with pytest.raises(RecipeError, match="image_column adds images to a text prompt"):
        vllm_generate(fake_server.url, messages_column="m", image_column="image")
    with pytest.raises(RecipeError, match="image_column only applies to mode 'chat'"):
        vllm_generate(fake_server.url, mode="completion", image_column="image")
    with pytest.raises(RecipeError) as info:
        Dataset.from_dict({"prompt": ["q"]}).map(generate(fake_server.url, image_column="image"), batched=True)
    assert "reads column(s) 'image' that the dataset does not have" in str(info.value)
    assert fake_server.log() == []


# --------------------------------------------------------------------------- streaming


def test_an_iterable_dataset_gets_the_same_columns_and_errors_as_a_dataset(fake_server: FakeServer) -> None:
    prompts = [f"question {i}" + (" [[400]]" if i == 3 else "") for i in range(10)] + [None]
    ds = Dataset.from_dict({"prompt": prompts}, features=Features({"prompt": Value("string")}))
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    transform = generate(fake_server.url, output_schema=schema, n=2, cache=False)  # both maps send (no journal)
    expected = ds.map(transform, batched=True, batch_size=4).to_list()
    fake_server.reset()
    streamed = list(ds.to_iterable_dataset(num_shards=2).map(transform, batched=True, batch_size=4))
    assert streamed == expected
    assert len(fake_server.log()) == 10  # the null row is not sent
    assert streamed[3]["error"].startswith("400 from ") and streamed[10]["error"].startswith("not sent: this row's prompt column")
    assert streamed[0]["response"] == ['{"n": 3}', '{"n": 3}'] and streamed[0]["parsed"] == [{"n": 3}, {"n": 3}]
    assert all(type(r["prompt_tokens"]) is int for r in streamed)


def test_an_iterable_dataset_writes_the_fixed_column_types(tmp_path: Path, fake_server: FakeServer) -> None:
    ds = Dataset.from_dict({"prompt": ["q [[400]]", "q1", "q2"]}).to_iterable_dataset()
    features = Features(
        {"prompt": Value("string"), **{c: Value("string") for c in ("response", "reasoning", "finish_reason")}}
        | {"prompt_tokens": Value("int64"), "completion_tokens": Value("int64"), "error": Value("string")}
    )
    mapped = ds.map(generate(fake_server.url), batched=True, batch_size=1, features=features)
    written = Dataset.from_generator(lambda: (yield from mapped), features=features)
    assert written["response"] == [None, "echo: q1", "echo: q2"]
    assert pa.types.is_string(written.data.table.schema.field("error").type)
    assert isinstance(features["response"], Value) and not isinstance(features["response"], List)


def test_a_recipe_refuses_streaming_with_the_reason(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "http://localhost:8000", data={"input": {"path": "in.parquet", "streaming": True}})
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert str(info.value).startswith(
        f"{recipe}: data.input.streaming: streaming: true is not supported by recipes: resume keys each chunk on the input's fingerprint"
    )
