"""Compile every Triton kernel specialization fastgrpo can launch, ahead of time, for sm_80 and sm_90.

Run as a script (the test suite spawns it without TRITON_INTERPRET, which would turn kernels into Python
functions): ``python tests/aot_compile.py [capability ...]``. Needs no GPU and no torch: the kernels are
imported from the repository's ``kernels/`` package, so CI also runs it in a small environment holding only
the oldest supported Triton (3.2, the one torch 2.6 pins). Prints one line per kernel and exits non-zero on
the first compile error.
"""

import os
import pathlib
import sys
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "the compile gate needs the real compiler"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the repository root: `kernels` as a package
from kernels import advantages, grpo_loss, token_logprobs  # noqa: E402

MODULES = [token_logprobs, grpo_loss, advantages]


def main(capabilities):
    count, start = 0, time.time()
    for module in MODULES:
        for fn, signature, constexprs, num_warps in module.aot_specializations():
            for cap in capabilities:
                missing = set(fn.arg_names) - set(signature) - set(constexprs)
                assert not missing, f"{fn.__name__}: no type for {missing}"
                sig = {name: "constexpr" if name in constexprs else signature[name] for name in fn.arg_names}
                # positional: Triton 3.2 names the third argument `constants`, 3.3+ `constexprs`
                src = ASTSource(fn, sig, constexprs)
                kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": num_warps})
                assert kernel.asm["cubin"], f"{fn.__name__} produced no cubin for sm_{cap}"
                count += 1
        print(f"{module.__name__}: ok")
    print(f"compiled {count} specializations for sm_{capabilities} in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]] or [80, 90])
