"""The ops' named parameters (kernels/params.py) against every place that reads them by position: the C++/CUDA
objective (csrc/token_objective.h), the Triton kernels' constants and signatures, and the ops' two schemas
(C++ ``fastgrpo::<op>`` and Triton ``fastgrpo::triton_<op>``). A reordered or renamed entry fails here."""

import pathlib
import re

import pytest
import torch

from fastgrpo.kernels import params as P

from conftest import DEVICE, kernel_backend

HEADER = (pathlib.Path(__file__).resolve().parents[1] / "csrc" / "token_objective.h").read_text()


def snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z][a-z])|(?<=[a-z0-9])(?=[A-Z])", "_", camel).lower()


def enum(name: str) -> list[str]:
    """The enumerators of a C++ enum, in order, as snake_case names without their leading ``k``."""
    body = re.search(rf"enum {name} : \w+ \{{(.*?)\}};", HEADER, re.S).group(1)
    values = [v.split("=")[0].strip() for v in body.split(",") if v.strip()]
    return [snake(v[1:]) for v in values if not v.startswith("kNum")]


def assignments(function: str, source: str) -> dict[str, str]:
    """``p.<field> = <index expression>`` inside the body of a C++ function: field → index expression."""
    body = re.search(rf"{function}\(.*?\{{(.*?)\n}}", HEADER, re.S).group(1)
    return dict(re.findall(rf"p\.(\w+) = {source}\[([^\]]+)\]", body))


def constant(name: str) -> int:
    return int(re.search(rf"constexpr int {name} = (\d+);", HEADER).group(1))


def test_token_rows_in_cpp():
    assert enum("TokenInput") == list(P.TOKEN_INPUTS)
    assert [n.removeprefix("out_") for n in enum("TokenOutput")] == list(P.TOKEN_OUTPUTS)


def test_codes_and_scalars_in_cpp():
    assert constant("kNumCodes") == len(P.CODES)
    assert constant("kNumAdvantageCodes") == len(P.ADVANTAGE_CODES)
    assert constant("kNumScalars") == len(P.SCALARS)
    assert constant("kNumAdvantageScalars") == len(P.ADVANTAGE_SCALARS)
    codes = {k: int(v) for k, v in assignments("ObjectiveParams unpack_codes", "c").items()}
    offset = len(P.CODES) - len(P.ADVANTAGE_CODES)
    for field, index in assignments("void unpack_advantage_codes", "c").items():
        codes[field] = offset + int(index.replace("offset", "0").replace(" ", "").lstrip("0+") or 0)
    assert sorted(codes, key=codes.get) == list(P.CODES) and sorted(codes.values()) == list(range(len(P.CODES)))
    scalars = {k: int(v) for k, v in assignments("void load_scalars", "s").items()}
    offset = len(P.SCALARS) - len(P.ADVANTAGE_SCALARS)
    scalars.update({k: offset + int(v) for k, v in assignments("void load_advantage_scalars", "s").items()})
    assert sorted(scalars, key=scalars.get) == list(P.SCALARS)
    assert sorted(scalars.values()) == list(range(len(P.SCALARS)))


def test_code_values_in_cpp():
    assert enum("Policy") == list(P.POLICY) and list(P.POLICY.values()) == list(range(len(P.POLICY)))
    assert [n.removeprefix("kl_") for n in enum("KL")] == list(P.KL) and list(P.KL.values()) == list(range(len(P.KL)))
    assert enum("AdvantageEstimator") == list(P.ADV_ESTIMATOR)
    assert list(P.ADV_ESTIMATOR.values()) == list(range(len(P.ADV_ESTIMATOR)))


def test_triton_constants_and_signatures():
    pytest.importorskip("triton")
    from fastgrpo.kernels import advantages as A
    from fastgrpo.kernels import grpo_loss as K

    value = lambda c: getattr(c, "value", c)  # noqa: E731  (tl.constexpr)
    for i, name in enumerate(P.TOKEN_INPUTS):
        assert value(getattr(K, name.upper())) == i, name
    for i, name in enumerate(P.TOKEN_OUTPUTS):
        assert value(getattr(K, "OUT_" + name.upper())) == i, name
    for i, name in enumerate(P.SCALARS):
        assert value(getattr(K, name.upper())) == i, name
    for i, name in enumerate(P.ADVANTAGE_SCALARS):
        assert value(getattr(A, name.upper())) == i, name
    assert value(K.NUM_OUTPUTS) == len(P.TOKEN_OUTPUTS)
    assert [value(getattr(K, n)) for n in ("PPO", "CISPO", "SAPO")] == [P.POLICY[n] for n in ("ppo", "cispo", "sapo")]
    assert [value(getattr(K, f"KL_{n.upper()}")) for n in ("none", "k1", "abs", "k2")] == [
        P.KL[n] for n in ("none", "k1", "abs", "k2")
    ]
    # the launchers pass the codes by name: the kernels must take them under those names, in that order
    args = K.grpo_loss_fwd_kernel.arg_names
    assert args[args.index(P.CODES[0]) :][: len(P.CODES)] == list(P.CODES)
    args = A.advantages_kernel.arg_names
    assert args[args.index(P.ADVANTAGE_CODES[0]) :][: len(P.ADVANTAGE_CODES)] == list(P.ADVANTAGE_CODES)


@pytest.mark.parametrize(
    "op",
    [
        "token_logprobs",
        "token_logprobs_backward",
        "grpo_loss_fused",
        "grpo_loss_fused_inplace_",
        "scale_grad_",
        "advantages",
    ],
)
def test_cpp_and_triton_ops_have_one_schema(op):
    """The C++ schema (csrc/ops.cpp) and the one Triton's launcher annotations give its op are the same."""
    kernel_backend("cpu" if DEVICE == "cpu" else "cuda")
    kernel_backend("triton")

    def signature(schema):  # a Python int list is inferred as SymInt[]; alias sets are named differently
        args = [
            (a.name, str(a.type).replace("SymInt", "int"), bool(a.alias_info and a.alias_info.is_write))
            for a in schema.arguments
        ]
        return args, [str(r.type) for r in schema.returns]

    cpp = getattr(torch.ops.fastgrpo, op).default._schema
    triton = getattr(torch.ops.fastgrpo, "triton_" + op).default._schema
    assert signature(triton) == signature(cpp)
