"""Text in, text out: an ``hf:`` folder with a fast tokenizer takes ``text`` and answers labels,
scores and embeddings, tokenized in the front end and padded to length buckets.

Every artifact is made here, offline: a tiny WordPiece tokenizer written with ``tokenizers``
and tiny random BERT checkpoints written with ``save_pretrained``.  The reference is the same
model run alone on each text's unpadded token ids."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from serverutil import ServerThread  # noqa: E402

from modelconsole.client import Model  # noqa: E402
from modelconsole.scheduler.config import ConfigError, model_from_dict  # noqa: E402
from modelconsole.scheduler.engine import Engine  # noqa: E402
from modelconsole.scheduler.errors import EngineError  # noqa: E402
from modelconsole.scheduler.textenc import TextPlan, bucket_for, default_buckets, encoder, padding_waste  # noqa: E402
from modelconsole.scheduler.trust import Trust  # noqa: E402

WORDS = ("the a good bad movie film was is not very great awful plot acting i loved hated it and but "
         "so really fun boring long short story").split()
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}
TOL = 1e-4  # padded vs alone: the same math over a different number of masked positions


def tokenizer(folder: Path, **config) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]", "model_max_length": 64,
                                                              **config}))


def bert_config(**kw):
    return transformers.BertConfig(vocab_size=len(WORDS) + 4, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=48, max_position_embeddings=64, **kw)


def classifier(folder: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(bert_config(num_labels=2, id2label=LABELS,
                                                                   label2id={v: k for k, v in LABELS.items()})).eval()
    model.save_pretrained(folder)
    tokenizer(folder)
    return model


def embedder(folder: Path) -> torch.nn.Module:
    torch.manual_seed(1)
    model = transformers.BertModel(bert_config()).eval()
    model.save_pretrained(folder)
    tokenizer(folder)
    return model


def alone(model, folder: Path, text: str) -> dict[str, torch.Tensor]:
    """The model on one text's own token ids, no padding: the reference."""
    from tokenizers import Tokenizer

    e = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text)
    ids = torch.tensor([e.ids])
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))


TEXTS = ["the movie was great", "i hated it", "a very long and boring story but the acting was really fun "
         "and the plot was not bad so i loved it"]


def test_buckets_and_padding_waste_are_pure():
    assert default_buckets(512) == (16, 32, 64, 128, 256, 512)
    assert default_buckets(40) == (16, 32, 40)
    assert bucket_for(17, (16, 32, 64)) == 32 and bucket_for(99, (16, 32, 64)) == 64
    assert padding_waste([10, 16, 20], (16, 32)) == pytest.approx((16 + 16 + 32 - 46) / 46)


async def test_a_classifier_takes_text_and_answers_labels_scores_and_logits(tmp_path):
    ref = classifier(tmp_path / "sentiment")
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as engine:
        snap = await engine.register({"name": "sentiment", "source": "hf:sentiment", "warmup": 0})
        assert [s["name"] for s in snap["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
        assert [(s["name"], s["datatype"]) for s in snap["outputs"]] == [
            ("logits", "FP32"), ("label", "BYTES"), ("score", "FP32")]
        assert snap["text"]["buckets"] == [16, 32, 64] and snap["text"]["max_length"] == 64
        plan = engine.instance("sentiment").text_plan
        ids = encoder(plan).encode({"text": np.array(TEXTS, dtype=object)})
        assert ids["input_ids"].shape == (3, 32)  # the longest (26 tokens) decides the bucket
        result = await engine.infer("sentiment", {k: torch.from_numpy(v) for k, v in ids.items()})
        for k, text in enumerate(TEXTS):
            want = alone(ref, tmp_path / "sentiment", text).logits[0]
            got = result.outputs["logits"][k]
            assert torch.allclose(got, want, atol=TOL), (text, got, want)
            probs = want.softmax(-1)
            assert result.outputs["label"][k] == LABELS[int(probs.argmax())].encode()
            assert abs(float(result.outputs["score"][k]) - float(probs.max())) < TOL
        waste = engine.instance("sentiment").snapshot()["text"]["padding_waste"]
        real = sum(len(t) for t in [ids["attention_mask"][k].nonzero()[0] for k in range(3)])
        assert waste == pytest.approx((3 * 32 - real) / real)


async def test_the_client_in_process_tokenizes_too(tmp_path):
    ref = classifier(tmp_path / "sentiment")
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as engine:
        await engine.register({"name": "sentiment", "source": "hf:sentiment", "warmup": 0})
        got = await Model("sentiment").apredict(TEXTS[:2])  # this process's engine: no server
    for k, text in enumerate(TEXTS[:2]):
        want = alone(ref, tmp_path / "sentiment", text).logits[0].softmax(-1)
        assert got["label"][k] == LABELS[int(want.argmax())]
        assert abs(float(got["score"][k]) - float(want.max())) < TOL


async def test_an_encoder_answers_pooled_embeddings(tmp_path):
    ref = embedder(tmp_path / "embed")
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as engine:
        await engine.register({"name": "mean", "source": "hf:embed", "warmup": 0, "normalize": True})
        await engine.register({"name": "cls", "source": "hf:embed", "warmup": 0, "pooling": "cls"})
        assert [s["name"] for s in engine.instance("mean").snapshot()["outputs"]] == ["embedding"]
        plan = engine.instance("mean").text_plan
        ids = {k: torch.from_numpy(v) for k, v in encoder(plan).encode({"text": np.array(TEXTS, dtype=object)}).items()}
        mean = (await engine.infer("mean", ids)).outputs["embedding"]
        first = (await engine.infer("cls", ids)).outputs["embedding"]
        for k, text in enumerate(TEXTS):
            h = alone(ref, tmp_path / "embed", text).last_hidden_state[0]
            want = h.mean(0)
            assert torch.allclose(mean[k], want / want.norm(), atol=TOL)
            assert torch.allclose(first[k], h[0], atol=TOL)
        assert torch.allclose(mean.norm(dim=-1), torch.ones(3), atol=TOL)


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module", params=[0, 1], ids=["one-process", "front-end-process"])
def text_server(request, tmp_path_factory):
    base = tmp_path_factory.mktemp("text")
    refs = {"sentiment": classifier(base / "sentiment")}
    models = [{"name": "sentiment", "source": "hf:sentiment", "warmup": 0, "max_queue_delay_ms": 5.0},
              {"name": "strict", "source": "hf:sentiment", "warmup": 0, "max_length": 16}]
    with ServerThread(base, models=models, workers=request.param, grpc_port=0) as srv:
        srv.base, srv.refs = base, refs
        yield srv


def test_over_http_through_a_front_end_text_comes_back_labelled(text_server):
    srv = text_server
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": TEXTS}]}
    status, doc = _post(f"{srv.url}/v2/models/sentiment/infer", json.dumps(body).encode())
    assert status == 200, doc
    out = {o["name"]: o for o in doc["outputs"]}
    for k, text in enumerate(TEXTS):
        want = alone(srv.refs["sentiment"], srv.base / "sentiment", text).logits[0].softmax(-1)
        assert out["label"]["data"][k] == LABELS[int(want.argmax())]
        assert abs(out["score"]["data"][k] - float(want.max())) < TOL
    many = [f"{TEXTS[2]} {TEXTS[2]}"] * 30  # over textenc.INLINE_BYTES: tokenized on a thread
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [30], "data": many}]}
    status, doc = _post(f"{srv.url}/v2/models/sentiment/infer", json.dumps(body).encode())
    assert status == 200 and len({o["name"]: o for o in doc["outputs"]}["label"]["data"]) == 30, doc
    meta = json.loads(urllib.request.urlopen(f"{srv.url}/v2/models/sentiment", timeout=30).read())
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]},
                              {"name": "text_pair", "datatype": "BYTES", "shape": [-1]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "label", "score"]


def test_the_client_and_tritonclient_send_text(text_server):
    srv = text_server
    got = Model("sentiment", url=srv.url).predict(TEXTS[0])
    want = alone(srv.refs["sentiment"], srv.base / "sentiment", TEXTS[0]).logits[0].softmax(-1)
    assert got["label"].tolist() == [LABELS[int(want.argmax())]]
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(srv.url.removeprefix("http://"))
    x = httpclient.InferInput("text", [2], "BYTES")
    x.set_data_from_numpy(np.array([t.encode() for t in TEXTS[:2]], dtype=object), binary_data=True)
    res = client.infer("sentiment", [x])
    labels = [b.decode() for b in res.as_numpy("label")]
    for k in range(2):
        w = alone(srv.refs["sentiment"], srv.base / "sentiment", TEXTS[k]).logits[0].softmax(-1)
        assert labels[k] == LABELS[int(w.argmax())]


def test_text_pairs_and_grpc(text_server):
    srv = text_server
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["the plot"]},
                       {"name": "text_pair", "datatype": "BYTES", "shape": [1], "data": ["was not good"]}]}
    status, doc = _post(f"{srv.url}/v2/models/sentiment/infer", json.dumps(body).encode())
    assert status == 200, doc
    from tokenizers import Tokenizer

    e = Tokenizer.from_file(str(srv.base / "sentiment" / "tokenizer.json")).encode("the plot", "was not good")
    ids, types = torch.tensor([e.ids]), torch.tensor([e.type_ids])
    assert types.sum() > 0  # the pair's second segment is typed 1, as BERT was trained
    with torch.inference_mode():
        want = srv.refs["sentiment"](input_ids=ids, attention_mask=torch.ones_like(ids),
                                     token_type_ids=types).logits[0]
    got = {o["name"]: o["data"] for o in doc["outputs"]}["logits"]
    assert np.allclose(got, want.numpy(), atol=TOL)
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url=srv.grpc_hostport)
    x = grpcclient.InferInput("text", [1], "BYTES")
    x.set_data_from_numpy(np.array([TEXTS[1].encode()], dtype=object))
    res = client.infer("sentiment", [x])
    w = alone(srv.refs["sentiment"], srv.base / "sentiment", TEXTS[1]).logits[0].softmax(-1)
    assert res.as_numpy("label")[0].decode() == LABELS[int(w.argmax())]
    client.close()


def test_bad_text_is_a_400_naming_why_and_the_server_serves_on(text_server):
    srv = text_server
    long = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [TEXTS[2]]}]}
    status, doc = _post(f"{srv.url}/v2/models/strict/infer", json.dumps(long).encode())
    assert status == 400 and "max_length of 16" in doc["error"] and "truncation is off" in doc["error"], doc
    head = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                   "parameters": {"binary_data_size": 6}}]}).encode()
    raw = head + (2).to_bytes(4, "little") + b"\xff\xfe"
    status, doc = _post(f"{srv.url}/v2/models/sentiment/infer", raw,
                        {"Inference-Header-Content-Length": str(len(head))})
    assert status == 400 and "not UTF-8" in doc["error"], doc
    ok = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["fun"]}]}
    assert _post(f"{srv.url}/v2/models/sentiment/infer", json.dumps(ok).encode())[0] == 200


async def test_a_token_classifier_labels_each_position(tmp_path):
    torch.manual_seed(2)
    tags = {0: "O", 1: "B-THING", 2: "I-THING"}
    ref = transformers.BertForTokenClassification(bert_config(num_labels=3, id2label=tags,
                                                             label2id={v: k for k, v in tags.items()})).eval()
    ref.save_pretrained(tmp_path / "ner")
    tokenizer(tmp_path / "ner")
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as engine:
        snap = await engine.register({"name": "ner", "source": "hf:ner", "warmup": 0, "buckets": [8, 32]})
        assert [(s["name"], s["shape"]) for s in snap["outputs"]] == [
            ("logits", [-1, -1, 3]), ("label", [-1, -1]), ("score", [-1, -1])]
        plan = engine.instance("ner").text_plan
        assert plan.buckets == (8, 32, 64)  # max_length closes the list
        ids = encoder(plan).encode({"text": np.array(TEXTS[:2], dtype=object)})
        assert ids["input_ids"].shape == (2, 8)
        out = (await engine.infer("ner", {k: torch.from_numpy(v) for k, v in ids.items()})).outputs
        for k, text in enumerate(TEXTS[:2]):
            want = alone(ref, tmp_path / "ner", text).logits[0]
            n = len(want)
            assert torch.allclose(out["logits"][k, :n], want, atol=TOL)
            assert [b.decode() for b in out["label"][k, :n]] == [tags[int(i)] for i in want.argmax(-1)]


async def test_a_tokenizer_that_wants_remote_code_is_refused_at_registration(tmp_path):
    classifier(tmp_path / "m")
    tokenizer(tmp_path / "m", auto_map={"AutoTokenizer": ["tok.MyTokenizer", None]})
    async with Engine(None, base_dir=str(tmp_path), default_device="cpu") as engine:
        with pytest.raises(EngineError, match="remote code"):
            await engine.register({"name": "m", "source": "hf:m", "warmup": 0})
        assert engine.model_names() == []


def test_text_keys_are_checked(tmp_path):
    roots = (str(tmp_path),)

    def cfg(**raw):
        return model_from_dict({"name": "m", "source": "hf:x", **raw}, base_dir=str(tmp_path), model_roots=roots,
                               trust=Trust(roots, ()))

    with pytest.raises(ConfigError, match="buckets: expected ascending"):
        cfg(buckets=[64, 32])
    with pytest.raises(ConfigError, match='pooling: expected "mean" or "cls"'):
        cfg(pooling="max")
    with pytest.raises(ConfigError, match="only used with hf: sources"):
        model_from_dict({"name": "m", "source": "zoo:tiny-mlp", "max_length": 8})
    assert TextPlan.from_dict(TextPlan("t.json", 8, False, (8,), False, False, 0).to_dict()).max_length == 8


@pytest.fixture(scope="module")
def fuzz_plan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    tokenizer(folder)
    return TextPlan(str(folder / "tokenizer.json"), 16, False, (8, 16), True, True, 0)


def test_a_huge_text_or_too_many_are_refused_or_cut_without_growing(fuzz_plan):
    from modelconsole.scheduler.errors import InputError

    huge = np.array(["movie " * 200_000], dtype=object)  # 1.2 MB, 200,000 tokens
    with pytest.raises(InputError, match="element 0 is over this model's max_length of 16 tokens"):
        encoder(fuzz_plan).encode({"text": huge})
    cut = TextPlan(fuzz_plan.tokenizer, 16, True, (8, 16), False, False, 0, max_rows=2)
    out = encoder(cut).encode({"text": huge})
    assert out["input_ids"].shape == (1, 16) and out["attention_mask"].all()
    with pytest.raises(InputError, match="3 strings, over this model's max_batch_size of 2"):
        encoder(cut).encode({"text": np.array(["a", "b", "c"], dtype=object)})


def test_fuzzed_text_is_tokenized_or_refused_with_a_400(fuzz_plan):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from modelconsole.scheduler.errors import InputError
    from modelconsole.scheduler.wire import bytes_from_wire, bytes_to_wire

    enc = encoder(fuzz_plan)
    element = st.one_of(st.text(max_size=40), st.binary(max_size=40), st.integers())

    @settings(max_examples=200, deadline=None)
    @given(st.lists(element, min_size=0, max_size=5), st.booleans())
    def check(items, pair):
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        inputs = {"text": arr, **({"text_pair": arr} if pair else {})}
        try:
            out = enc.encode(inputs)
        except InputError as e:
            assert e.status == 400 and e.message.split(":")[0] in ("text", "text_pair")
            return
        assert out["input_ids"].shape == out["attention_mask"].shape == (len(items), out["input_ids"].shape[1])
        assert out["input_ids"].shape[1] in fuzz_plan.buckets
        assert ((out["attention_mask"] == 0) | (out["attention_mask"] == 1)).all()
        blobs = [i.encode() if isinstance(i, str) else i for i in items if isinstance(i, (str, bytes))]
        packed = np.empty(len(blobs), dtype=object)
        packed[:] = blobs
        assert bytes_from_wire("x", bytes_to_wire("x", packed)) == blobs

    check()
