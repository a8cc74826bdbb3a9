"""Request bodies -> model feeds and outputs -> JSON answers, without Ray or HTTP."""

from __future__ import annotations

import io
import json
import time
import zipfile

import numpy as np
import pytest
from PIL import Image
from tiny_onnx import image_classifier, two_in_two_out

import bnfold
from bnfold.images import load_image
from bnfold.on_ray import payloads
from bnfold.on_ray.payloads import ARRAYS, IMAGE, JSON, TooLargeError, answer, body_kind, decode_body, json_bytes

X = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 1, 2, 2)
LIMIT = 10**6  # elements a body may decode to


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> bnfold.Predictor:
    path = image_classifier(tmp_path_factory.mktemp("payloads") / "c.onnx", labels=["cat", "dog", "eel"])
    return bnfold.Predictor(path, device="cpu")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> bnfold.Predictor:
    return bnfold.Predictor(two_in_two_out(tmp_path_factory.mktemp("payloads") / "p.onnx"), device="cpu")


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("header", "kind"),
    [
        (None, JSON),
        ("application/json; charset=utf-8", JSON),
        ("application/x-npy", ARRAYS),
        ("Application/X-NPZ", ARRAYS),
        ("application/octet-stream", ARRAYS),
        ("image/png", IMAGE),
        ("text/plain", None),
        ("multipart/form-data; boundary=x", None),
    ],
)
def test_body_kind_from_the_content_type(header, kind):
    assert body_kind(header) == kind


def test_json_npy_and_npz_bodies_give_the_same_feeds(classifier):
    from_json = decode_body(json.dumps({"inputs": X.tolist()}).encode(), JSON, classifier, LIMIT)
    from_npy = decode_body(npy(X), ARRAYS, classifier, LIMIT)
    buffer = io.BytesIO()
    np.savez(buffer, x=X)
    from_npz = decode_body(buffer.getvalue(), ARRAYS, classifier, LIMIT)
    for feeds in (from_json, from_npy, from_npz):
        assert list(feeds) == ["x"] and feeds["x"].dtype == np.float32
        np.testing.assert_array_equal(feeds["x"], X)


def test_json_integers_are_read_as_the_input_float_type(classifier):
    feeds = decode_body(json.dumps({"inputs": [[[[0, 1], [2, 3]]]]}).encode(), JSON, classifier, LIMIT)
    assert feeds["x"].dtype == np.float32 and feeds["x"].tolist() == [[[[0.0, 1.0], [2.0, 3.0]]]]


def test_an_image_body_is_one_item_read_with_the_stored_preprocessing(classifier):
    pixels = np.array([[0, 64], [128, 255]], dtype=np.uint8)
    feeds = decode_body(png(pixels), IMAGE, classifier, LIMIT)
    expected = load_image(io.BytesIO(png(pixels)), classifier.preprocess)[None]
    np.testing.assert_array_equal(feeds["x"], expected)
    np.testing.assert_allclose(feeds["x"].ravel(), (pixels.ravel() / 255 - 0.5) / 0.25, atol=1e-5)


def test_several_inputs_by_name_in_json_and_npz(pair):
    a, b = np.ones((2, 3), np.float32), np.arange(6, dtype=np.float32).reshape(2, 3)
    feeds = decode_body(json.dumps({"inputs": {"b": b.tolist(), "a": a.tolist()}}).encode(), JSON, pair, LIMIT)
    assert list(feeds) == ["a", "b"]
    np.testing.assert_array_equal(feeds["b"], b)
    buffer = io.BytesIO()
    np.savez(buffer, a=a, b=b)
    np.testing.assert_array_equal(decode_body(buffer.getvalue(), ARRAYS, pair, LIMIT)["a"], a)


@pytest.mark.parametrize(
    ("body", "kind", "message"),
    [
        (b"{not json", JSON, "request body: not valid JSON"),
        (b"\xff\xfe", JSON, "request body: not valid JSON"),
        (b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", JSON, "request body: not valid JSON"),
        (b"[1, 2]", JSON, 'expected a JSON object {"inputs": ...}'),
        (b'{"x": [1]}', JSON, 'expected a JSON object {"inputs": ...}'),
        (b'{"inputs": [[[[1, 2], [3]]]]}', JSON, "input 'x' is not a rectangular nested list of numbers"),
        (b'{"inputs": [[[["a", 2], [3, 4]]]]}', JSON, "input 'x' is not a rectangular nested list of numbers"),
        (b'{"inputs": [[1, 2], [3, 4]]}', JSON, "input 'x': expected shape Nx1x2x2, got 2x2"),
        (b'{"inputs": []}', JSON, "the arrays hold no samples"),
        (b"not an array file", ARRAYS, "request body: not a readable .npy/.npz file"),
        (npy(np.ones((1, 1, 2, 2), dtype=np.int64)), ARRAYS, "has dtype int64; expected floats"),
        (npy(np.ones((1, 1, 3, 2), dtype=np.float32)), ARRAYS, "expected shape Nx1x2x2, got 1x1x3x2"),
        (b"GIF89a broken", IMAGE, "request body: not a readable image"),
        (b'{"inputs": {"nope": [[[[1, 2], [3, 4]]]]}}', JSON, "unknown input name(s) nope; the model's inputs are x"),
        (npz(x=np.ones((1, 1, 2, 2), np.float32), y=np.ones(1)), ARRAYS, "unknown input name(s) y"),
        (b'{"inputs": [[[[1, NaN], [3, 4]]]]}', JSON, "input 'x' holds NaN or infinite values"),
        (npy(np.full((1, 1, 2, 2), np.inf, np.float32)), ARRAYS, "input 'x' holds NaN or infinite values"),
    ],
)
def test_bad_bodies_are_one_line_usage_errors(classifier, body, kind, message):
    with pytest.raises(bnfold.UsageError) as caught:
        decode_body(body, kind, classifier, LIMIT)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def npy_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npz_bomb(elements: int) -> bytes:
    """A compressed .npz of ``elements`` float32 zeros (a thousandth of their size)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((elements, 1, 2, 2), np.float32))
    return buffer.getvalue()


def test_a_compressed_bomb_is_refused_from_its_header_without_being_decompressed(classifier, monkeypatch):
    body = npz_bomb(10**6)  # 4 million elements in 16 MB, sent as 16 kB
    assert len(body) < 10**5

    def not_decompressed(*args):
        raise AssertionError("the body was decoded")

    monkeypatch.setattr(payloads, "load_arrays", not_decompressed)
    start = time.perf_counter()
    with pytest.raises(TooLargeError, match=r"its arrays hold 4,000,000 values, more than the 100,000 this server"):
        decode_body(body, ARRAYS, classifier, 100_000)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(
    ("body", "kind", "values"),
    [
        (npy_header((10**13, 1, 2, 2)), ARRAYS, "40,000,000,000,000"),  # a .npy header without its data
        (png(np.zeros((400, 300), np.uint8)), IMAGE, "120,000"),  # a blank image: its pixels
        (png(np.zeros((200, 300, 3), np.uint8)), IMAGE, "180,000"),
    ],
)
def test_arrays_and_images_over_the_element_limit_are_refused_from_their_headers(classifier, body, kind, values):
    with pytest.raises(TooLargeError, match=f"{values} values, more than the 100,000"):
        decode_body(body, kind, classifier, 100_000)


def test_zip_members_that_are_not_arrays_count_their_bytes(classifier):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", npy(X))
        archive.writestr("notes", b"\0" * 200_000)
    with pytest.raises(TooLargeError, match="its arrays hold 200,008 values"):
        decode_body(buffer.getvalue(), ARRAYS, classifier, 100_000)


def test_bodies_at_the_element_limit_are_decoded(classifier):
    assert decode_body(npy(X), ARRAYS, classifier, X.size)["x"].shape == X.shape
    assert decode_body(png(np.zeros((2, 2), np.uint8)), IMAGE, classifier, 4)["x"].shape == (1, 1, 2, 2)


def test_pickled_object_arrays_are_refused(classifier):
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(bnfold.UsageError, match=r"not a readable \.npy/\.npz file"):
        decode_body(buffer.getvalue(), ARRAYS, classifier, LIMIT)


def test_images_need_stored_preprocessing_and_a_single_input(tmp_path, pair):
    plain = bnfold.Predictor(image_classifier(tmp_path / "plain.onnx", preprocess=False), device="cpu")
    with pytest.raises(bnfold.UsageError, match="no preprocessing metadata"):
        decode_body(png(np.zeros((2, 2), np.uint8)), IMAGE, plain, LIMIT)
    with pytest.raises(bnfold.UsageError, match="an image is one input, but this model has 2"):
        decode_body(png(np.zeros((2, 2), np.uint8)), IMAGE, pair, LIMIT)


def test_a_classifier_answer_has_outputs_and_top_k_with_labels(classifier):
    scores = np.array([[0.1, 0.9, 0.5], [2.0, -1.0, 0.0]], dtype=np.float32)
    body = json.loads(json_bytes(answer([scores], classifier, 2)))
    assert np.array_equal(np.asarray(body["outputs"], dtype=np.float32), scores)
    assert body["top_k"] == [
        {"indices": [1, 2], "scores": [pytest.approx(0.9), pytest.approx(0.5)], "labels": ["dog", "eel"]},
        {"indices": [0, 2], "scores": [2.0, 0.0], "labels": ["cat", "eel"]},
    ]


def test_several_outputs_are_named_and_have_no_top_k_unless_the_first_is_scores(pair):
    total, product = np.ones((1, 3, 1), np.float32), np.zeros((1, 3, 1), np.float32)
    body = json.loads(json_bytes(answer([total, product], pair, 5)))
    assert body == {"outputs": {"total": [[[1.0], [1.0], [1.0]]], "product": [[[0.0], [0.0], [0.0]]]}}


def test_non_finite_outputs_become_null(classifier):
    text = json_bytes(answer([np.array([[np.nan, 1.0, -np.inf]], dtype=np.float32)], classifier, 1))
    assert json.loads(text)["outputs"] == [[None, 1.0, None]]
    assert b"NaN" not in text and b"Infinity" not in text


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32),  # written by orjson
        np.random.default_rng(1).standard_normal((7, 3)).astype(np.float32).T,  # not C-contiguous
        np.random.default_rng(2).standard_normal((3, 7)).astype(np.float16),
        np.arange(-5, 16, dtype=np.int64).reshape(3, 7),
        np.zeros((2, 0), np.float32),
    ],
    ids=["float32", "transposed", "float16", "int64", "empty"],
)
def test_json_answers_read_back_to_the_same_values(array):
    text = json_bytes({"outputs": array})
    assert np.array_equal(np.asarray(json.loads(text)["outputs"], dtype=array.dtype), array)
    if array.dtype == np.float32 and array.size:  # in float32's shortest form, not float64's
        assert len(text) < len(json.dumps({"outputs": array.tolist()}))


def test_json_bodies_with_nan_and_infinity_as_python_writes_them_are_read_and_refused_by_name(classifier):
    x = X.copy()
    x[0, 0, 0, 0], x[1, 0, 1, 1] = np.nan, np.inf
    with pytest.raises(bnfold.UsageError, match="input 'x' holds NaN or infinite values"):
        decode_body(json.dumps({"inputs": x.tolist()}).encode(), JSON, classifier, LIMIT)
