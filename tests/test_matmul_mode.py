"""The products' math mode on a GPU (cdm_kernels.matmul_mode): every way a user can set torch's TF32
switch, each mode inside, the user's setting read back the same afterwards, also after an exception.
The flags are plain process state, so this runs on any machine; tests/test_gpu.py checks the bits."""

import contextlib
import threading

import pytest
import torch

from cdm_kernels import matmul_mode
from cdm_kernels.matmul_mode import products

M = torch.backends.cuda.matmul
CUDA = torch.device("cuda")

SETTINGS = {
    "default": lambda: None,
    "legacy allow_tf32=True": lambda: setattr(M, "allow_tf32", True),
    "legacy allow_tf32=False": lambda: setattr(M, "allow_tf32", False),
    "matmul fp32_precision=tf32": lambda: setattr(M, "fp32_precision", "tf32"),
    "matmul fp32_precision=ieee": lambda: setattr(M, "fp32_precision", "ieee"),
    "matmul fp32_precision=none": lambda: setattr(M, "fp32_precision", "none"),
    "generic fp32_precision=tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
    "generic fp32_precision=ieee": lambda: setattr(torch.backends, "fp32_precision", "ieee"),
    "cudnn fp32_precision=tf32": lambda: setattr(torch.backends.cudnn, "fp32_precision", "tf32"),
    "cudnn fp32_precision=ieee": lambda: setattr(torch.backends.cudnn, "fp32_precision", "ieee"),
    "generic tf32, matmul ieee": lambda: (setattr(torch.backends, "fp32_precision", "tf32"),
                                          setattr(M, "fp32_precision", "ieee")),
    "set_float32_matmul_precision(high)": lambda: torch.set_float32_matmul_precision("high"),
    "set_float32_matmul_precision(medium)": lambda: torch.set_float32_matmul_precision("medium"),
    "set_float32_matmul_precision(highest)": lambda: torch.set_float32_matmul_precision("highest"),
}

new_api = pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch before 2.9")


def _reads():
    """Everything a user can read back, with 'raises' where the read raises."""
    out = []
    for read in (lambda: M.fp32_precision, lambda: torch.backends.fp32_precision,
                 lambda: torch.backends.cudnn.fp32_precision, lambda: M.allow_tf32,
                 torch.get_float32_matmul_precision):
        try:
            out.append(read())
        except RuntimeError:
            out.append("raises")
    return tuple(out)


@pytest.fixture(autouse=True)
def _torch_defaults():
    yield
    torch.backends.fp32_precision = "none"
    torch.backends.cudnn.fp32_precision = "none"
    M.fp32_precision = "none"
    torch.set_float32_matmul_precision("highest")
    M.fp32_precision = "none"


@new_api
def test_the_hazard_is_real():
    """Why the module exists: after the new API's TF32, torch's legacy flag raises when read."""
    M.fp32_precision = "tf32"
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        M.allow_tf32  # noqa: B018


@new_api
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("tf32", [False, True])
@pytest.mark.parametrize("fails", [False, True])
def test_mode_inside_and_setting_restored(setting, tf32, fails):
    SETTINGS[setting]()
    before = _reads()
    with pytest.raises(KeyError) if fails else contextlib.nullcontext():
        with products(tf32, CUDA):
            assert M.fp32_precision == ("tf32" if tf32 else "ieee")
            assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee")
            if fails:
                raise KeyError("a product failed")
    assert _reads() == before


@new_api
@pytest.mark.parametrize("parent", ["generic", "cudnn"])
def test_an_inherited_setting_still_follows_its_parent_after_a_region(parent):
    # The user's matmul setting was "none" (inherit); after a region it must still inherit, so a
    # later change of the level above shows through.
    level = torch.backends if parent == "generic" else torch.backends.cudnn
    level.fp32_precision = "tf32"
    with products(False, CUDA):
        pass
    level.fp32_precision = "ieee"
    assert M.fp32_precision == "ieee"


@new_api
@pytest.mark.parametrize("tf32", [False, True])
def test_nested_regions_restore_the_outer_mode(tf32):
    M.fp32_precision = "tf32"
    before = _reads()
    with products(not tf32, CUDA):
        with products(tf32, CUDA):
            assert M.fp32_precision == ("tf32" if tf32 else "ieee")
        assert M.fp32_precision == ("ieee" if tf32 else "tf32")
    assert _reads() == before


def test_nothing_changes_off_cuda():
    M.allow_tf32 = True
    with products(False, torch.device("cpu")):
        assert M.allow_tf32 is True
    assert M.allow_tf32 is True


def test_legacy_only_torch(monkeypatch):
    """Before torch 2.9 (no fp32_precision) the legacy flag is set and restored."""
    monkeypatch.setattr(matmul_mode, "_has_new_api", lambda: False)
    M.allow_tf32 = True
    with pytest.raises(ValueError):
        with products(False, CUDA):
            assert M.allow_tf32 is False
            raise ValueError
    assert M.allow_tf32 is True


@new_api
def test_threads_do_not_interleave_their_set_and_restore():
    """Two threads' regions, each holding its mode for a while: each sees its own mode throughout,
    and the user's setting is intact at the end."""
    M.fp32_precision = "tf32"
    before = _reads()
    seen = {True: set(), False: set()}
    barrier = threading.Barrier(2)

    def work(tf32):
        barrier.wait()
        for _ in range(200):
            with products(tf32, CUDA):
                for _ in range(5):
                    seen[tf32].add(M.fp32_precision)

    threads = [threading.Thread(target=work, args=(t,)) for t in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {True: {"tf32"}, False: {"ieee"}}
    assert _reads() == before

