"""Faults survived and memory bounded: GPU out of memory, global caches, shared models.

This machine has no GPU: the out-of-memory tests simulate one (the encoder is
told it is on a GPU, and a hook makes its model raise CUDA's out-of-memory
error). A real-GPU variant runs where CUDA is present.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import ASSETS, ROOT, make_encoding
from PIL import Image

from compress import cache
from compress.cache import EncodingCache, LRUCache, ModelPool, SharedEncodings, env_int
from compress.encoder import OOM_NOTICE, cpu_copy, run_with_cpu_fallback


def _oom():
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


# --- GPU out of memory -> retried on the CPU ---------------------------------------------


def test_fallback_runs_on_the_cpu_after_gpu_oom():
    calls = []
    out, notice = run_with_cpu_fallback(_oom, lambda: calls.append("cpu") or "cpu result", on_gpu=True)
    assert (out, calls) == ("cpu result", ["cpu"])
    assert notice == OOM_NOTICE and "GPU out of memory" in notice and "CPU" in notice


def test_no_fault_no_notice_and_cpu_path_untouched():
    def cpu():
        raise AssertionError("the CPU path must not run")
    assert run_with_cpu_fallback(lambda: 42, cpu, on_gpu=True) == (42, "")


def test_oom_on_the_cpu_and_other_errors_are_not_retried():
    def cpu():
        raise AssertionError("the CPU path must not run")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_with_cpu_fallback(_oom, cpu, on_gpu=False)

    def broken():
        raise RuntimeError("a bug, not a lack of memory")
    with pytest.raises(RuntimeError, match="a bug"):
        run_with_cpu_fallback(broken, cpu, on_gpu=True)


def simulate_gpu_oom(encoder, monkeypatch) -> list:
    """Make ``encoder`` pretend to be on a GPU whose first block runs out of memory.

    Simulated: ``_on_gpu`` says yes, and a pre-hook on the main model's first
    block raises ``torch.cuda.OutOfMemoryError``. The hook is copied into the
    CPU copy too, but fires only for the original block. Returns the list the
    hook appends to each time it fires; undone with ``monkeypatch``.
    """
    target = encoder.net.blocks[0]
    fired = []

    def hook(module, _args):
        if module is target:
            fired.append(1)
            _oom()

    monkeypatch.setattr(encoder, "_on_gpu", lambda: True)
    monkeypatch.setattr(encoder, "_cpu_net", None)  # restored afterwards: the copy goes too
    monkeypatch.setattr(target, "_forward_pre_hooks", type(target._forward_pre_hooks)())
    target.register_forward_pre_hook(hook)
    return fired


def test_encode_retries_on_the_cpu_with_a_notice(encoder, monkeypatch):
    image = Image.open(ASSETS / "chelsea.jpg")
    ok = encoder.encode(image, size=112)
    fired = simulate_gpu_oom(encoder, monkeypatch)
    out = encoder.encode(image, size=112)
    assert fired == [1]
    assert out.notice == OOM_NOTICE and out.device.type == "cpu"
    assert torch.allclose(out.tokens, ok.tokens, atol=1e-5)
    assert torch.allclose(out.cls_attn, ok.cls_attn, atol=1e-6)
    copy_net = encoder._cpu_net
    assert copy_net is not None and copy_net is not encoder.net
    again = encoder.encode(image, size=112, layer=3)
    assert again.notice == OOM_NOTICE and encoder._cpu_net is copy_net  # the CPU copy is kept
    assert fired == [1, 1] and ok.notice == ""


def test_other_encode_errors_propagate_and_the_encoder_survives(encoder, monkeypatch):
    monkeypatch.setattr(encoder, "_on_gpu", lambda: True)

    def broken(_module, _args):
        raise RuntimeError("injected fault")
    handle = encoder.net.blocks[0].register_forward_pre_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            encoder.encode(Image.new("RGB", (32, 32)), size=56)
    finally:
        handle.remove()
    assert encoder._cpu_net is None  # no fallback for a non-OOM error
    assert encoder.encode(Image.new("RGB", (32, 32)), size=56).notice == ""


def test_cpu_copy_is_independent(encoder):
    dup = cpu_copy(encoder.net)
    a, b = dict(encoder.net.named_parameters()), dict(dup.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].data_ptr() != b[k].data_ptr() for k in a)
    assert all(p.device.type == "cpu" for p in dup.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_oom_falls_back_without_gpu_allocation():
    from compress import Encoder

    gpu = Encoder(device="cuda")
    target = gpu.net.blocks[0]
    handle = target.register_forward_pre_hook(lambda m, _a: _oom() if m is target else None)
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        net = gpu.cpu_net()
        assert torch.cuda.memory_allocated() == before  # the copy never touched the GPU
        assert all(p.device.type == "cpu" for p in net.parameters())
        out = gpu.encode(Image.open(ASSETS / "coffee.jpg"), size=224)
    finally:
        handle.remove()
    assert out.notice == OOM_NOTICE and out.tokens.device.type == "cpu"


# --- bounded memory: a global cap on cached encodings ----------------------------------------


class FakeEncoder:
    """Stands in for ``Encoder`` in cache tests: counts encodes, returns tiny encodings."""

    name, device, depth = "fake", torch.device("cpu"), 12

    def __init__(self):
        self.calls = 0

    def resolve_layer(self, layer):
        return layer % self.depth

    def encode(self, image, size, layer, keep_aspect):
        self.calls += 1
        return make_encoding(torch.randn(4, 2), (2, 2))


def _get(session, enc, digest):
    return session.get_or_encode(enc, None, digest, 112, -1, False)


def test_global_cap_evicts_the_least_recently_used_across_sessions():
    store = SharedEncodings(capacity=3)
    fake = FakeEncoder()
    a, b, c = (EncodingCache(capacity=4, store=store) for _ in range(3))
    first, cached = _get(a, fake, "img1")
    assert not cached
    _get(b, fake, "img2")
    _get(c, fake, "img3")
    assert _get(a, fake, "img1") == (first, True)  # touch: img1 is now the most recent
    _get(c, fake, "img4")  # a fourth encoding: img2 (b's) is the globally oldest
    assert len(store) == 3 and len(a) == 1 and len(b) == 0 and len(c) == 2
    calls = fake.calls
    _, cached = _get(b, fake, "img2")  # b lost its encoding: re-encoded, not an error
    assert not cached and fake.calls == calls + 1
    assert len(store) == 3


def test_session_cap_and_ttl_free_the_global_store():
    now = [0.0]
    store = SharedEncodings(capacity=10, clock=lambda: now[0])
    fake = FakeEncoder()
    s = EncodingCache(capacity=2, ttl=60, store=store, clock=lambda: now[0])
    idle = EncodingCache(capacity=2, ttl=60, store=store, clock=lambda: now[0])
    for d in ("x", "y", "z"):
        _get(s, fake, d)
    assert len(s) == 2 and len(store) == 2  # the session's own LRU pushed "x" out of the store
    _get(idle, fake, "w")
    assert len(store) == 3
    now[0] = 61.0  # the idle session is never touched again: its encoding still expires
    assert len(store) == 0


def test_a_garbage_collected_session_frees_its_encodings():
    store = SharedEncodings(capacity=10)
    fake = FakeEncoder()
    keep, gone = EncodingCache(store=store), EncodingCache(store=store)
    _get(keep, fake, "a")
    _get(gone, fake, "b")
    _get(gone, fake, "c")
    del gone
    gc.collect()
    assert len(store) == 1 and len(keep) == 1


def test_global_cap_holds_under_concurrent_sessions():
    store = SharedEncodings(capacity=5)
    fake = FakeEncoder()
    sessions = [EncodingCache(capacity=3, store=store) for _ in range(8)]
    errors, peak = [], [0]

    def user(i):
        try:
            for step in range(60):
                _get(sessions[i], fake, f"{i}-{step % 7}")
                peak[0] = max(peak[0], len(store))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and peak[0] <= 5 and len(store) <= 5


def test_lru_cache_reports_every_eviction():
    gone = []
    lru = LRUCache(capacity=2, on_evict=lambda k, v: gone.append(k))
    lru.put("a", 1)
    lru.put("b", 2)
    lru.put("a", 3)  # overwritten, not evicted
    lru.put("c", 4)
    lru.discard("c")
    assert gone == ["b", "c"] and lru.keys() == ["a"]


def test_caps_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TCE_TEST_CAP", "7")
    assert env_int("TCE_TEST_CAP", 64) == 7
    monkeypatch.setenv("TCE_TEST_CAP", " ")
    assert env_int("TCE_TEST_CAP", 64) == 64
    for bad in ("0", "-3", "many", "2.5"):
        monkeypatch.setenv("TCE_TEST_CAP", bad)
        with pytest.raises(ValueError, match="TCE_TEST_CAP must be a whole number >= 1"):
            env_int("TCE_TEST_CAP", 64)
    code = "import compress.cache as c; print(c.ENCODINGS.capacity, c.MODELS.capacity)"
    env = {**os.environ, "TCE_MAX_ENCODINGS": "5", "TCE_MAX_MODELS": "2"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.split() == ["5", "2"]


# --- models loaded once, at most TCE_MAX_MODELS, never the bundled default evicted ------------


def _factory(log, delay: float = 0.0):
    def make(model, device):
        import time

        time.sleep(delay)
        if model == "broken":
            raise ValueError("model 'broken' cannot be loaded")
        log.append(model)
        return object()
    return make


def test_model_pool_evicts_least_recently_used_but_never_the_default():
    loads = []
    pool = ModelPool(capacity=3, factory=_factory(loads), keep=("dinov2-s14",))
    default = pool.get("dinov2-s14", "cpu")
    a = pool.get("a", "cpu")
    pool.get("b", "cpu")
    assert pool.get(" a ", "cpu") is a  # the same model is loaded once
    pool.get("c", "cpu")  # over the cap: "b" is the least recently used that may go
    assert pool.loaded() == [("dinov2-s14", "cpu"), ("a", "cpu"), ("c", "cpu")]
    assert pool.get("dinov2-s14", "cpu") is default and loads.count("dinov2-s14") == 1
    pool.get("b", "cpu")
    assert ("a", "cpu") not in pool.loaded() and len(pool) == 3
    assert loads == ["dinov2-s14", "a", "b", "c", "b"]


def test_model_pool_of_one_keeps_only_the_default():
    loads = []
    pool = ModelPool(capacity=1, factory=_factory(loads), keep=("dinov2-s14",))
    pool.get("dinov2-s14", "cpu")
    assert pool.get("other", "cpu") is not None  # served, but not kept
    assert pool.loaded() == [("dinov2-s14", "cpu")]


def test_model_pool_loads_once_under_concurrency_and_does_not_cache_failures():
    loads = []
    pool = ModelPool(capacity=3, factory=_factory(loads, delay=0.05))
    got = []
    threads = [threading.Thread(target=lambda: got.append(pool.get("m", "cpu"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert loads == ["m"] and len(got) == 6 and all(g is got[0] for g in got)
    for _ in range(2):
        with pytest.raises(ValueError, match="cannot be loaded"):
            pool.get("broken", "cpu")
    assert pool.loaded() == [("m", "cpu")]


def test_shared_encoder_uses_the_process_pool(monkeypatch):
    loads = []
    monkeypatch.setattr(cache, "MODELS", ModelPool(capacity=2, factory=_factory(loads)))
    assert cache.shared_encoder("x", "cpu") is cache.shared_encoder("x", "cpu")
    assert loads == ["x"]


def test_sessions_share_an_encoding_of_the_same_picture_and_encode_it_once():
    """Sixteen sessions asking for the same picture at the same moment: one encode, one object;
    a different picture or setting is encoded on its own."""
    import time as _time

    store = SharedEncodings(capacity=64)

    class SlowFake(FakeEncoder):
        def encode(self, image, size, layer, keep_aspect):
            _time.sleep(0.2)  # long enough for every thread to arrive while it runs
            return super().encode(image, size, layer, keep_aspect)

    fake = SlowFake()
    sessions = [EncodingCache(capacity=4, store=store) for _ in range(16)]
    got = [None] * 16
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, _get(sessions[i], fake, "class")))
               for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert fake.calls == 1
    assert len({id(enc) for enc, _ in got}) == 1
    assert sorted(cached for _, cached in got) == [False] + [True] * 15
    _get(sessions[0], fake, "another picture")
    assert fake.calls == 2
    sessions[0].get_or_encode(fake, None, "class", 224, -1, False)  # same picture, other size
    assert fake.calls == 3
