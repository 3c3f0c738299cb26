"""The shared validators of euphonium._checks: types, bounds, None, non-finite values, paths, tensors."""

import math

import pytest
import torch

from euphonium._checks import (
    check_bool,
    check_choice,
    check_finite,
    check_float,
    check_float_tensor,
    check_index_tensor,
    check_int,
    check_like,
    check_path,
    check_positive,
    per_sample,
)

NON_FINITE = [math.nan, math.inf, -math.inf]


def test_check_bool():
    assert check_bool("flag", True) is True and check_bool("flag", False) is False
    for value in (0, 1, "true", None, torch.tensor(True), 1.0):
        with pytest.raises(TypeError, match=r"^flag must be a bool \(True or False\), got "):
            check_bool("flag", value)


def test_check_int_refuses_bools_floats_and_none():
    assert check_int("n", 0) == 0 and check_int("n", -5) == -5 and check_int("n", 2**70) == 2**70
    for value in (True, False, 1.0, "1", None, torch.tensor(1)):
        with pytest.raises(TypeError, match=r"^n must be an integer, got "):
            check_int("n", value)


def test_check_int_bounds_are_closed():
    assert check_int("n", 1, minimum=1, maximum=3) == 1
    assert check_int("n", 3, minimum=1, maximum=3) == 3
    with pytest.raises(ValueError, match=r"^n must be >= 1, got 0$"):
        check_int("n", 0, minimum=1, maximum=3)
    with pytest.raises(ValueError, match=r"^n must be <= 3, got 4$"):
        check_int("n", 4, minimum=1, maximum=3)


def test_check_int_none_only_when_asked():
    assert check_int("n", None, minimum=1, allow_none=True) is None
    assert check_int("n", 2, minimum=1, allow_none=True) == 2
    with pytest.raises(TypeError, match=r"^n must be an integer or None, got 1.5"):
        check_int("n", 1.5, allow_none=True)
    with pytest.raises(TypeError, match="must be an integer, got None"):
        check_int("n", None)


def test_check_float_types():
    assert check_float("x", 2) == 2.0 and isinstance(check_float("x", 2), float)
    for value in (True, "0.5", None, torch.tensor(0.5), [0.5]):
        with pytest.raises(TypeError, match=r"^x must be a number, got "):
            check_float("x", value)
    assert check_float("x", None, allow_none=True) is None
    with pytest.raises(TypeError, match=r"^x must be a number or null, got True"):
        check_float("x", True, allow_none=True)


@pytest.mark.parametrize("value", NON_FINITE)
def test_check_float_refuses_non_finite(value):
    with pytest.raises(ValueError, match=r"^x must be a finite number, got"):
        check_float("x", value)
    with pytest.raises(ValueError, match=r"^x must be a finite number in \[0, 1\], got"):
        check_float("x", value, minimum=0, maximum=1)
    with pytest.raises(ValueError, match="finite"):
        check_float("x", value, allow_none=True)


def test_check_float_bounds_open_and_closed():
    assert check_float("x", 0.0, minimum=0.0, maximum=1.0) == 0.0
    assert check_float("x", 1.0, minimum=0.0, maximum=1.0) == 1.0
    with pytest.raises(ValueError, match=r"^x must be in \(0, 1\], got 0$"):
        check_float("x", 0.0, minimum=0.0, maximum=1.0, min_open=True)
    with pytest.raises(ValueError, match=r"^x must be in \[0, 1\), got 1$"):
        check_float("x", 1.0, minimum=0.0, maximum=1.0, max_open=True)
    assert check_float("x", 1e-300, minimum=0.0, min_open=True) == 1e-300
    with pytest.raises(ValueError, match=r"^x must be > 0, got -1e-300$"):
        check_float("x", -1e-300, minimum=0.0, min_open=True)
    with pytest.raises(ValueError, match=r"^x must be <= 2, got 2.5$"):
        check_float("x", 2.5, maximum=2)


def test_check_positive():
    assert check_positive("lr", 1e-4) == 1e-4
    assert check_positive("wd", 0, allow_zero=True) == 0.0
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got 0.0$"):
        check_positive("lr", 0)
    with pytest.raises(ValueError, match=r"^wd must be a finite number >= 0, got -1.0$"):
        check_positive("wd", -1, allow_zero=True)
    for value in NON_FINITE:
        with pytest.raises(ValueError, match="finite"):
            check_positive("lr", value)
    with pytest.raises(TypeError, match=r"^lr must be a number, got bool"):
        check_positive("lr", True)
    with pytest.raises(TypeError, match=r"^lr must be a number, got NoneType"):
        check_positive("lr", None)
    assert check_positive("clip", None, allow_none=True) is None
    with pytest.raises(TypeError, match=r"^clip must be a number or None, got str"):
        check_positive("clip", "1", allow_none=True)


def test_check_choice():
    assert check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"^mode must be one of \['a', 'b'\], got 'c'$"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match="got None"):
        check_choice("mode", None, ("a", "b"))


def test_check_path(tmp_path):
    file = tmp_path / "f.txt"
    file.write_text("x")
    assert check_path("p", str(tmp_path), kind="dir") == tmp_path
    assert check_path("p", file, kind="file", must_exist=True) == file
    assert check_path("p", tmp_path / "new" / "deeper", kind="dir") == tmp_path / "new" / "deeper"
    with pytest.raises(ValueError, match=r"is a file, not a folder"):
        check_path("p", file, kind="dir")
    with pytest.raises(ValueError, match=r"is not a file"):
        check_path("p", tmp_path, kind="file")
    with pytest.raises(ValueError, match=r"does not exist"):
        check_path("p", tmp_path / "missing", must_exist=True)
    with pytest.raises(ValueError, match=r"cannot be created: .*f.txt is a file"):
        check_path("p", file / "sub", kind="dir")
    for value in ("", None, 3, True, b"bytes"):
        with pytest.raises(TypeError, match=r"^p must be a non-empty path"):
            check_path("p", value)
    with pytest.raises(ValueError, match="kind must be one of"):
        check_path("p", tmp_path, kind="folder")


def test_tensor_checks():
    x = torch.randn(2, 3)
    assert check_float_tensor("x", x) is x
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        check_float_tensor("x", [1.0])
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        check_float_tensor("x", torch.ones(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        check_float_tensor("x", torch.ones(2), min_dim=2)
    with pytest.raises(ValueError, match="empty batch"):
        check_float_tensor("x", torch.ones(0, 3))
    with pytest.raises(ValueError, match=r"v must have the shape of x \(2, 3\)"):
        check_like("v", torch.randn(3, 2), "x", x)
    ids = torch.tensor([0, 1])
    assert check_index_tensor("ids", ids, 2, "x", x) is ids
    with pytest.raises(TypeError, match="integer tensor"):
        check_index_tensor("ids", torch.tensor([True, False]), 2, "x", x)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        check_index_tensor("ids", torch.tensor([0, 1, 2]), 2, "x", x)


def test_per_sample_and_check_finite():
    out = per_sample("sigma", 0.5, 3, torch.device("cpu"))
    assert out.dtype == torch.float32 and out.tolist() == [0.5] * 3
    expanded = per_sample("sigma", torch.tensor(0.25, dtype=torch.float64), 3, torch.device("cpu"))
    assert expanded.is_contiguous() and expanded.stride() == (1,) and expanded.tolist() == [0.25] * 3
    with pytest.raises(TypeError, match="sigma must be a float or a \\[B\\] tensor, got bool"):
        per_sample("sigma", True, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"shape \[3\]"):
        per_sample("sigma", torch.ones(2), 3, torch.device("cpu"))
    check_finite("r", torch.ones(3, 2))
    bad = torch.ones(3, 2)
    bad[2, 1] = math.inf
    with pytest.raises(ValueError, match=r"^r has non-finite values \(first at sample 2\); why$"):
        check_finite("r", bad, what="why")
    # Finite values whose sum overflows are not reported.
    check_finite("r", torch.full((4,), 3e38))
