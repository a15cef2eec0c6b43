"""Compile the expert kernels for a Hopper GPU (sm_90) on any machine, no GPU needed, to catch what
Triton's CPU interpreter accepts but the compiler refuses (e.g. Python globals inside a kernel), and to
read what the compiler made of a kernel (shared memory, pipelined async copies, wgmma).

    python -m moesys.kernels.compile_check            # the variants the backend launches, bf16
    python -m moesys.kernels.compile_check --all      # every activation/bias/dtype variant (minutes)

Must run without TRITON_INTERPRET=1 (the interpreter's kernels cannot be compiled). Pointers and
strides are declared 16-divisible and inner strides 1, as a real launch specializes them; without that
Triton neither vectorizes nor software-pipelines the loads.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moesys.activations import FUNCTIONS, Activation, clamped_swiglu
from moesys.kernels.act import act_constexprs
from moesys.kernels.act_backward import act_backward_kernel
from moesys.kernels.act_forward import act_forward_kernel
from moesys.kernels.grouped_gemm import EPI_ACT_FWD, EPI_SCATTER, EPI_STORE, expert_wgrad_kernel, grouped_gemm_kernel
from moesys.kernels.routing import BLOCK_GPU, sort_routing_kernel
from moesys.kernels.token_sum import token_sum_kernel

_NOT_DIVISIBLE = {"num_rows", "E", "I", "rows_bucket", "N", "K", "H"}
_PTR_TYPES = {"token_ptr": "*i32", "offsets_ptr": "*i32", "rw_ptr": "*fp32", "drw_ptr": "*fp32", "perm_ptr": "*i64",
              "ids_ptr": "*i64", "inv_ptr": "*i64"}  # ids as the router makes them


def compile_variant(kernel, consts: dict, dtype: str = "bf16", out_fp32: bool = False, num_warps=8, num_stages=3,
                    ptr_types: dict | None = None, pointers_only: bool = False):
    """pointers_only: only the pointers declared 16-divisible (kernels whose sizes and strides take any value)."""
    ptr_types = {**_PTR_TYPES, **(ptr_types or {})}
    sig = {}
    # tensor descriptors, as launch.py passes them: the weights (b_desc) or the sorted operand (s_desc)
    for desc, flag in (("b_desc", "B_DESC"), ("s_desc", "S_DESC")):
        if desc not in kernel.arg_names:
            continue
        if not consts[flag]:
            consts = {**consts, desc: None}
            continue
        if desc == "b_desc":
            block = [1, consts["BN"], consts["BK"]] if consts["B_KCONTIG"] else [1, consts["BK"], consts["BN"]]
        else:
            block = [consts["BK"], consts["BN"] if consts["GATHER_P"] else consts["BM"]]
        sig[desc] = f"tensordesc<{dtype}[{','.join(map(str, block))}]>"
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in sig:
            continue
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if (out_fp32 and name == "out_ptr") else ptr_types.get(name, "*" + dtype)
        else:
            sig[name] = ptr_types.get(name, "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if sig[n] != "constexpr" and n not in _NOT_DIVISIBLE and not sig[n].startswith("tensordesc")
             and (not pointers_only or n.endswith("_ptr"))}
    src = ASTSource(fn=kernel, signature=sig, attrs=attrs,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def variants(all_variants: bool, dtype: str):
    """(name, kernel, constexprs, out_fp32) for the launches of one fwd+bwd; with all_variants, every combo."""
    prec = "ieee" if dtype == "fp32" else "tf32"
    tile = dict(BM=128, BN=128, BK=64, GROUP_M=8, UPCAST=False, DOT_PREC=prec)
    gemm = dict(tile, E_P2=8, stride_ak=1, stride_on=1, stride_hn=1, B_DESC=True)
    # the default run: gated silu and gelu_tanh (descriptor weights), GPT-OSS's clamped SwiGLU (interleaved,
    # so pointer weights); --all: every function gated and plain
    acts = ([Activation(fn, gated) for fn in FUNCTIONS for gated in (True, False)] + [clamped_swiglu()]
            if all_variants else [Activation("silu", True), Activation("gelu_tanh", True), clamped_swiglu()])
    flags = (False, True) if all_variants else (True,)
    for act, bias, save_h in itertools.product(acts, flags, flags):
        yield (f"fwd_gate_up act={act.key} bias={bias} save_h={save_h}", grouped_gemm_kernel,
               dict(gemm, EPILOGUE=EPI_ACT_FWD, GATHER_A=True, GATED=act.gated, HAS_BIAS=bias, SAVE_H=save_h,
                    SCALE=False, **act_constexprs(act), stride_bk=1, B_KCONTIG=True,
                    B_DESC=not act.interleaved), False)
    for scale, bias in itertools.product((False, True), flags):
        yield (f"scatter scale={scale} bias={bias}", grouped_gemm_kernel,
               dict(gemm, EPILOGUE=EPI_SCATTER, GATHER_A=False, GATED=False, HAS_BIAS=bias, SAVE_H=False,
                    SCALE=scale, ACT=0, stride_bk=1, B_KCONTIG=True), True)
    yield ("bwd_down (gather, store)", grouped_gemm_kernel,
           dict(gemm, EPILOGUE=EPI_STORE, GATHER_A=True, GATED=False, HAS_BIAS=False, SAVE_H=False,
                SCALE=False, ACT=0, stride_bn=1, B_DESC=False, B_KCONTIG=False), False)
    if all_variants:  # forward weights the descriptor cannot read (unaligned strides) go through pointers
        yield ("scatter, pointer weights", grouped_gemm_kernel,
               dict(gemm, EPILOGUE=EPI_SCATTER, GATHER_A=False, GATED=False, HAS_BIAS=False, SAVE_H=False,
                    SCALE=True, ACT=0, B_DESC=False, B_KCONTIG=True, stride_bk=1), True)
    for act in acts:
        consts = dict(GATED=act.gated, **act_constexprs(act), BR=16, BC=256)
        yield (f"act_backward act={act.key}", act_backward_kernel, consts, False)
        yield (f"act_forward act={act.key}", act_forward_kernel, consts, False)
    for gather_p, s_desc in itertools.product((True, False), (True, False) if all_variants else (True,)):
        yield (f"wgrad gather_p={gather_p} s_desc={s_desc}", expert_wgrad_kernel,
               dict(tile, GATHER_P=gather_p, GATHER_Q=not gather_p, S_DESC=s_desc, stride_pm=1, stride_qn=1), False)
    yield ("sort_routing", sort_routing_kernel, dict(BLOCK=BLOCK_GPU), False)
    yield ("token_sum", token_sum_kernel, dict(BH=1024), False)


def quant_variants():
    """(name, kernel, constexprs, out_fp32, pointer types) of the offload engine's grouped quantized decode
    (moesys.offload.quant_grouped): gate/up and down, int4 and int8, scale groups of 128 columns."""
    from moesys.offload.quant_grouped import CONFIG, _quant_grouped_kernel

    tile = {k: v for k, v in CONFIG.items() if k not in ("num_warps", "num_stages")}
    silu = {k: v for k, v in act_constexprs(Activation("silu", True)).items() if k != "INTERLEAVED"}
    for mode, up in itertools.product(("int4", "int8"), (True, False)):
        consts = dict(tile, E_P2=64, GROUP=128, INT4=mode == "int4", UP=up, UPCAST=False, DOT_PREC="tf32", **silu)
        types = {"q_ptr": "*u8" if mode == "int4" else "*i8", "s_ptr": "*fp32", "slots_ptr": "*i64",
                 "perm_ptr": "*i64", "offsets_ptr": "*i32"}
        yield f"quant_grouped {mode} {'gate_up' if up else 'down'}", _quant_grouped_kernel, consts, not up, types


def exact_variants():
    """(name, kernel, constexprs, dtype, pointer and scalar types) of exact mode's batch-invariant kernels
    (moesys.kernels.batch_invariant, moesys.kernels.exact_attention), at the tiles they always launch."""
    from moesys.kernels.batch_invariant import MM_BLOCK_K, MM_BLOCK_M, MM_BLOCK_N, _bmm_kernel, _row_sum_kernel
    from moesys.kernels.exact_attention import BLOCK_KEYS, _attention_kernel

    mm = dict(BM=MM_BLOCK_M, BN=MM_BLOCK_N, BK=MM_BLOCK_K, UPCAST=False)
    for dtype, bias in itertools.product(("bf16", "fp32"), (False, True)):
        yield f"exact mm {dtype} bias={bias}", _bmm_kernel, dict(mm, HAS_BIAS=bias, IEEE=dtype == "fp32"), dtype, {}
    yield "exact row_sum", _row_sum_kernel, dict(BLOCK=1024), "fp32", {}
    for mask, sink in itertools.product((False, True), (False, True)):
        yield (f"exact attention mask={mask} sinks={sink}", _attention_kernel,
               dict(BD=128, BDV=128, BN=BLOCK_KEYS, HAS_MASK=mask, HAS_SINK=sink), "bf16",
               {"mask_ptr": "*i1", "sink_ptr": "*fp32", "scale": "fp32"})


def device_cache_variants():
    """(name, kernel, constexprs, num_warps) of the offload engine's device bookkeeping (moesys.offload.device_cache):
    one token's step and a batch's (a bank of 1023 slots, 128 experts), each policy, lookup and prefetch; and the
    prefetch's vote over 128 experts (moesys.offload.prefetch). Compiled here because the CPU tests run them in the
    interpreter only."""
    from moesys.offload.device_cache import _batch_step_kernel, _step_kernel

    policies = {"lru": dict(LFU=False, NEXT_VISIT=False), "lfu": dict(LFU=True, NEXT_VISIT=False),
                "next-visit": dict(LFU=False, NEXT_VISIT=True)}
    for (policy, flags), prefetch in itertools.product(policies.items(), (False, True)):
        yield (f"device_cache step {policy} prefetch={prefetch}", _step_kernel,
               dict(flags, PREFETCH=prefetch, BLOCK_B=1024, BLOCK_K=8), 4)
        yield (f"device_cache batch_step {policy} prefetch={prefetch}", _batch_step_kernel,
               dict(flags, PREFETCH=prefetch, BLOCK_E=128, BLOCK_B=1024, LOG_B=10, CHUNK=32), 8)
    from moesys.offload.prefetch import _vote_kernel

    yield "prefetch vote", _vote_kernel, dict(BLOCK_E=128, CHUNK=32), 4


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--all", action="store_true", help="every activation, bias and dtype variant")
    args = ap.parse_args(argv)
    if not isinstance(grouped_gemm_kernel, triton.runtime.jit.JITFunction):
        print("compile_check: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)", file=sys.stderr)
        return 2
    for dtype in ("bf16", "fp16", "fp32") if args.all else ("bf16",):
        for name, kernel, consts, out_fp32 in variants(args.all, dtype):
            compiled = compile_variant(kernel, consts, dtype, out_fp32)
            ttgir = compiled.asm["ttgir"]
            no_dot = (act_backward_kernel, act_forward_kernel, sort_routing_kernel, token_sum_kernel)
            if kernel in no_dot:  # nothing to pipeline
                print(f"{dtype} {name}: shared {compiled.metadata.shared} B", flush=True)
                continue
            print(f"{dtype} {name}: shared {compiled.metadata.shared} B, "
                  f"async copies {ttgir.count('async_copy_global_to_local')}, "
                  f"TMA loads {ttgir.count('async_tma_copy_global_to_local')}, "
                  f"wgmma {ttgir.count('warp_group_dot')}", flush=True)
    from moesys.offload.quant_grouped import CONFIG

    for name, kernel, consts, out_fp32, types in quant_variants():
        compiled = compile_variant(kernel, consts, "bf16", out_fp32, ptr_types=types, num_warps=CONFIG["num_warps"],
                                   num_stages=CONFIG["num_stages"])
        print(f"bf16 {name}: shared {compiled.metadata.shared} B, "
              f"dots {compiled.asm['ttgir'].count('warp_group_dot') + compiled.asm['ttgir'].count('tt.dot')}",
              flush=True)
    for name, kernel, consts, dtype, types in exact_variants():
        compiled = compile_variant(kernel, consts, dtype, ptr_types=types, num_warps=4, num_stages=2,
                                   pointers_only=True)
        print(f"{dtype} {name}: shared {compiled.metadata.shared} B", flush=True)
    for name, kernel, consts, warps in device_cache_variants():
        types = {n: "*i64" for n in kernel.arg_names if n.endswith("_ptr")}
        compiled = compile_variant(kernel, consts, ptr_types=types, num_warps=warps, num_stages=1, pointers_only=True)
        print(f"{name}: shared {compiled.metadata.shared} B", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
