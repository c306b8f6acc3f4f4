"""M7: the warp-specialized decode kernel (Gluon). The interpreter cannot run Gluon, so on a CPU the tests compile it
for an H200 and read what the compiler made; on a Hopper GPU they also compare it with the reference."""

from __future__ import annotations

import pytest
import torch

from folovllm.model_executor.layers.quantization.ops import gluon_gptq as ws
from folovllm.model_executor.layers.quantization.ops.gptq_gemm import gptq_gemm_reference, pack_for_kernel
from folovllm.triton_utils.offline_compile import ptxas_report, sass_loop

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _cuda_layer(k: int, n: int, bits: int, group: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A random ``bits``-bit layer on the GPU in the kernel layout: ``qweight``, fp16 ``scales`` and ``zeros``."""
    codes = torch.randint(0, 2**bits, (k, n), device="cuda", generator=gen)
    groups = 1 if group == -1 else k // group
    scales = (torch.rand(groups, n, device="cuda", generator=gen) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 2**bits, (groups, n), device="cuda", generator=gen).half()
    return pack_for_kernel(codes, bits), scales, zeros


def test_loader_warp_streams_with_tma_and_compute_warps_multiply_codes_from_registers():
    """Compiled for an H200 on this CPU: one loader warp with 24 registers issues TMA copies (per block the words,
    eight X slices, the zero points and the scales); the compute warpgroup runs ``wgmma`` m64n16k16 whose first
    operand, the codes made bf16, stays in registers (16 per block of a 128-column tile, made by
    ``_byte_perm_asm``). Its loop reads shared memory only (no global load waits in it) and fits 80 registers a
    thread (three programs per SM) without touching local memory."""
    asm = ws.compile_ws_plan(ws.WsPlan(block_n=128, split_k=4, stages=4))
    ptx = asm["ptx"]
    assert ptx.count("cp.async.bulk.tensor") == 4 + 8 + 2  # the words in four boxes 128 bytes wide (the swizzle)
    assert "setmaxnreg.dec.sync.aligned.u32 \t24" in ptx
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16") == 16
    # a thread's 128 codes per block: 64 registers of two, one lop3 and one sub.bf16x2 each, 16 byte permutes
    assert (ptx.count("lop3.b32"), ptx.count("sub.bf16x2"), ptx.count("prmt.b32")) == (64, 64, 16)
    assert "#ttg.dot_op<{opIdx = 0" in asm["ttgir"] and "ttg.warp_specialize" in asm["ttgir"]
    loop = sass_loop(ptx)
    assert not [t for t in loop if "LDG" in t or "LDL" in t or "STL" in t]
    assert ptxas_report(ptx)["registers"] == 80
    ring = 4 * (16 * 128 * 4 + 8 * 16 * 16 * 2 + 2 * 128 * 2)  # four stages: words, X slices, zero points, scales
    assert ring < int(asm["shared"]) < ring + 1024


@pytest.mark.parametrize(("m_tile", "block_n", "warps", "maxnreg"), [(32, 64, 4, 80), (64, 64, 4, 96), (64, 128, 8, 128)])
def test_up_to_64_rows_share_each_block_of_words_in_one_product(m_tile, block_n, warps, maxnreg):
    """Compiled for an H200 on this CPU: with 32 or 64 rows of X per product the weights are still read once per
    block (one ``wgmma`` m64nMk16 per 16 codes a warpgroup converts, N = the rows), and the register caps the sweep
    offers hold both accumulators without spilling."""
    asm = ws.compile_ws_plan(ws.WsPlan(block_n, 4, 4, False, maxnreg, warps, m_tile))
    assert asm["ptx"].count(f"wgmma.mma_async.sync.aligned.m64n{m_tile}k16.f32.bf16.bf16") == 8 * block_n // (16 * warps)
    assert ptxas_report(asm["ptx"]) == {"registers": maxnreg, "spill_bytes": 0}


@pytest.mark.parametrize(
    ("block_n", "warps", "maxnreg", "stages", "async_mma", "compute_regs"),
    [(128, 8, 128, 2, False, 176), (256, 8, 168, 4, True, 240), (128, 4, 128, 2, False, 232)],
)
def test_prefill_tiles_multiply_128_rows_by_the_scaled_weights(block_n, warps, maxnreg, stages, async_mma, compute_regs):
    """Compiled for an H200 on this CPU: a prefill plan multiplies each block of codes it converts by 128 rows of X
    (``wgmma`` m64n128k16), the codes made the weights themselves (one ``mul.rn.bf16x2`` by the scale per operand
    register, two codes of a column each: ``block_n * 128 / (2 * 32 * warps)`` a thread). The loader gives its
    registers back and the compute warps raise theirs from the pool ``maxnreg`` sets (``setmaxnreg``), enough for
    the one accumulator without spilling, even 256 columns wide; the ring (the block's words and 128 rows of X per
    stage) fits the 227 KiB of shared memory a Hopper SM has."""
    asm = ws.compile_ws_plan(ws.WsPlan(block_n, 1, stages, async_mma, maxnreg, warps, ws.PREFILL_M_TILE, scaled=True))
    ptx = asm["ptx"]
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16") == 8 * block_n // (16 * warps)
    assert ptx.count("mul.rn.bf16x2") == block_n * 128 // (2 * 32 * warps)
    assert f"setmaxnreg.inc.sync.aligned.u32 \t{compute_regs}" in ptx and "setmaxnreg.dec.sync.aligned.u32 \t24" in ptx
    assert ptxas_report(ptx) == {"registers": maxnreg, "spill_bytes": 0}
    ring = stages * (16 * block_n * 4 + 8 * 128 * 16 * 2 + 2 * block_n * 2)
    assert ring < int(asm["shared"]) < min(ring + 1024, 227 * 1024)


def test_byte_perm_takes_a_quarter_of_the_compute_loops_machine_instructions():
    """Compiled down to SASS: the compute warps' loop per block (128 codes a thread) with ``_byte_perm_asm`` against
    the same plan with the codes made by Gluon integer operations; same 16 products, at least 20% fewer
    instructions, fewer LOP3 and PRMT (ptxas had already fused each AND with its OR)."""
    from folovllm.triton_utils.offline_compile import opcode_counts

    new, old = (sass_loop(ws.compile_ws_plan(ws.WsPlan(128, 2, 4, False, 64, 4, 8, perm))["ptx"]) for perm in (True, False))
    ops_new, ops_old = opcode_counts(new), opcode_counts(old)
    assert ops_new["HGMMA"] == ops_old["HGMMA"] == 16
    assert len(new) <= 0.8 * len(old)
    assert ops_new["LOP3"] <= ops_old["LOP3"] // 2 + 2 and ops_new["PRMT"] < ops_old["PRMT"] // 2


def _opcodes_around_atomic(ptx: str) -> tuple[list[str], list[str]]:
    """The kernel's SASS opcodes (predicates dropped) before and from the split-K arrival's atomic."""
    from folovllm.triton_utils.offline_compile import sass

    code = [text.split()[text.startswith("@")] for _, text in sass(ptx)]
    atomic = next(i for i, op in enumerate(code) if op.startswith("ATOMG"))
    return code[:atomic], code[atomic:]


def test_split_k_reduction_loads_every_partial_sum_before_adding():
    """Compiled down to SASS: the last split of a one-row tile (eight splits) issues its loads of all eight partial
    sums before the first add, so they cost one round trip to L2, not eight in a row (the loop the reduction was
    before); a 64-row tile, whose sums would not fit the register cap at once, still loads split by split."""

    def after_atomic(plan: ws.WsPlan) -> list[str]:
        tail = _opcodes_around_atomic(ws.compile_ws_plan(plan)["ptx"])[1]
        return [op.split(".")[0] for op in tail if op.startswith(("LDG", "FADD"))]

    one_row = after_atomic(ws.WsPlan(128, 8, 2, False, 80, 4, 8))
    assert one_row.index("FADD") == one_row.count("LDG") == 64  # 8 sums a thread, 8 splits
    wide = after_atomic(ws.WsPlan(64, 4, 3, False, 96, 4, 64))
    assert wide.index("FADD") == wide.count("LDG") == 64 * 64 // 128  # one split's 32 sums a thread, in a loop


def test_split_k_reduction_of_16_row_tiles_moves_whole_vectors_and_loads_what_fits_the_registers():
    """``down_proj``'s tuned plan at 16 rows (16 sums a thread, eight splits at 80 registers) spilled 208 bytes a thread
    when all 128 loads were in flight at once, each four bytes (``wgmma``'s accumulator gives a thread rows a column
    apart). Now the partial sums go through a layout of their own, a thread's four rows in one 16-byte copy (16 rows
    of X, as a launch with 16 rows is specialized), four splits at a time in a loop, added in split order: four
    stores, 16 loads, no spill."""
    plan = ws.WsPlan(128, 8, 3, False, 80, 4, 16)
    ptx = ws.compile_ws_plan(plan, rows_divisible=True)["ptx"]
    assert ptxas_report(ptx)["spill_bytes"] == 0
    before, after = _opcodes_around_atomic(ptx)
    assert [op for op in before if op.startswith("STG")] == ["STG.E.128"] * 4
    assert [op for op in after if op.startswith("LDG")] == ["LDG.E.128"] * (4 * 4)


def test_pdl_streams_the_first_stages_weights_before_waiting_for_the_kernel_before():
    """Under programmatic dependent launch the program lets the next kernel start, issues the TMA copies of its
    first four blocks' words, zero points and scales (which no kernel writes), then ``griddepcontrol.wait``, then X
    (which the kernel before writes); without PDL neither instruction is emitted."""
    plain = ws.compile_ws_plan(ws.WsPlan(128, 8, 4))["ptx"]
    assert "griddepcontrol" not in plain
    per_block = plain.count("cp.async.bulk.tensor")  # the loop's one block: its words, 8 X slices, zeros, scales
    ptx = ws.compile_ws_plan(ws.WsPlan(128, 8, 4), pdl=True)["ptx"]
    assert ptx.count("griddepcontrol.wait") == 2  # the loader's, and the epilogue's before any store
    before, after = ptx.split("griddepcontrol.wait", 1)
    assert "griddepcontrol.launch_dependents" in before
    assert before.count("cp.async.bulk.tensor") == 4 * (per_block - 8)  # 4 stages' weights, none of X
    assert after.count("cp.async.bulk.tensor") == 4 * 8 + per_block  # their X slices, then the ring's loop
    assert "st.global" not in before and "atom" not in before


def _run_ptx(asm: str, regs: dict[str, int]) -> dict[str, int]:
    """The four PTX instructions ``_byte_perm_asm`` uses, on Python integers (32-bit registers)."""
    for line in asm.strip("{}\n").splitlines():
        op, args = line.split(" ", 1)
        if op == ".reg":
            continue
        d, *src = [a.strip() for a in args.rstrip(";").split(",")]
        val = [regs[a] if a in regs else int(a, 0) for a in src]
        if op == "prmt.b32":  # selector nibble i picks byte i of the result from the 8 bytes of (a, b)
            both = val[0] | val[1] << 32
            regs[d] = sum(((both >> 8 * ((val[2] >> 4 * i) & 7)) & 0xFF) << 8 * i for i in range(4))
        elif op == "shr.u32":
            regs[d] = val[0] >> val[1]
        elif op == "lop3.b32":
            assert val[3] == 0xEA  # (a & b) | c
            regs[d] = (val[0] & val[1]) | val[2]
        elif op == "sub.bf16x2":
            halves = [(val[0] >> s & 0xFFFF, val[1] >> s & 0xFFFF) for s in (0, 16)]
            diffs = [torch.tensor([a, b], dtype=torch.int32).to(torch.int16).view(torch.bfloat16) for a, b in halves]
            regs[d] = sum((int((x[0] - x[1]).view(torch.int16)) & 0xFFFF) << s for x, s in zip(diffs, (0, 16)))
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return regs


@pytest.mark.parametrize("bits", [4, 2])
def test_byte_perm_asm_makes_both_halves_of_a_register_from_one_field_of_two_words(bits):
    """Each output register of ``_byte_perm_asm`` is one ``wgmma`` A register: bit field ``p`` of word row ``c`` in its
    low half and of row ``c + 1`` in its high half, as bf16 ``q - z``; emulated here instruction by instruction."""
    gen = torch.Generator().manual_seed(bits)
    pack = 32 // bits
    for _ in range(20):
        w0, w1 = (int(v) for v in torch.randint(0, 2**32, (2,), generator=gen, dtype=torch.int64))
        z = int(torch.randint(0, 2**bits, (1,), generator=gen))
        off = int(torch.tensor([128.0 + z]).bfloat16().view(torch.int16)) & 0xFFFF
        for q in range(pack // 4):
            regs = _run_ptx(ws._byte_perm_asm.fn(bits, q), {"$4": w0, "$5": w1, "$6": off | off << 16})
            for i in range(4):
                field = q * 4 + i
                want = [(w >> field * bits & (2**bits - 1)) - z for w in (w0, w1)]
                got = torch.tensor([regs[f"${i}"] & 0xFFFF, regs[f"${i}"] >> 16], dtype=torch.int32).to(torch.int16)
                assert got.view(torch.bfloat16).tolist() == want


def test_ws_supported_names_what_the_kernel_serves():
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    assert not ws.ws_supported(x, torch.zeros(32, 64, dtype=torch.int32), None, 4, 128)  # a CPU tensor
    assert ws.WS_MAX_M == 64 and ws.M_TILES == (8, 16, 32, 64)


@pytest.mark.skipif(not HOPPER, reason="Gluon's warp-specialized kernel runs on Hopper GPUs only")
@pytest.mark.parametrize(
    ("k", "n", "bits", "group", "m", "with_bias", "plan"),
    [
        (1024, 320, 4, 128, 1, False, ws.WsPlan(64, 2, 4, True)),
        (1024, 320, 4, -1, 16, True, ws.WsPlan(128, 1, 4, False)),
        (2048, 256, 2, 256, 5, False, ws.WsPlan(128, 4, 2, True)),
        (1024, 384, 4, 128, 7, True, ws.WsPlan(128, 16, 4, False, 64, 8, 8)),
        (1024, 320, 4, 128, 3, True, ws.WsPlan(64, 2, 4, False, byte_perm=False)),
        (2048, 256, 2, 256, 9, False, ws.WsPlan(128, 4, 2, False, byte_perm=False)),
        (1024, 384, 4, 128, 16, True, ws.WsPlan(128, 8, 2, False, 80, 4, 16)),  # partial sums in 16-byte copies
        (1024, 384, 4, 128, 12, False, ws.WsPlan(128, 2, 2, False, 80, 8, 16)),  # ... of rows not a multiple of 4
        (1024, 320, 4, 128, 24, True, ws.WsPlan(64, 2, 4, False, 80, 4, 32)),
        (2048, 256, 2, 256, 33, False, ws.WsPlan(64, 4, 3, False, 96, 4, 64)),
        (1024, 384, 4, -1, 64, False, ws.WsPlan(128, 2, 4, False, 128, 8, 64)),
        (1024, 320, 4, 128, 200, True, ws.WsPlan(64, 1, 3, False, 128, 4, 128)),
        (2048, 256, 4, 128, 300, False, ws.WsPlan(128, 1, 2, False, 128, 8, 128, scaled=True)),
        (1024, 384, 4, 128, 129, False, ws.WsPlan(128, 2, 2, True, 168, 8, 128, scaled=True)),
        (2048, 512, 2, 256, 257, True, ws.WsPlan(256, 1, 2, True, 168, 8, 128, scaled=True)),
        (1024, 320, 4, 128, 333, True, ws.WsPlan(128, 1, 2, False, 128, 4, 128, scaled=True)),
        (1024, 320, 4, -1, 140, False, ws.WsPlan(256, 1, 4, False, 168, 8, 128, scaled=True)),
    ],
)
def test_ws_kernel_equals_the_reference(k, n, bits, group, m, with_bias, plan):
    gen = torch.Generator(device="cuda").manual_seed(k + m)
    qweight, scales, zeros = _cuda_layer(k, n, bits, group, gen)
    bias = torch.randn(n, device="cuda", generator=gen).bfloat16() if with_bias else None
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    assert ws.ws_supported(x, qweight, None, bits, group)
    got = ws.launch_gptq_decode_ws(x, qweight, scales, zeros, bias, bits, group, plan)
    ref = gptq_gemm_reference(x.float(), qweight, scales, zeros, None, bias, bits, group)
    assert (got.float() - ref).abs().max() <= 0.01 * ref.abs().max()


def test_ws_plan_runs_its_triton_twin_where_gluon_cannot():
    """On a CPU, and wherever the Gluon kernel does not apply (here: groups of 32 rows, shorter than a K block), a
    ``ws`` plan runs the pairs kernel with the same tiles and split, so a tuned table with Gluon plans serves every
    caller."""
    from folovllm.model_executor.layers.quantization.ops.gptq_gemm import GemmPlan, gptq_gemm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(3)
    k, n, group = 512, 128, 32
    codes = torch.randint(0, 16, (k, n), generator=gen, device=device)
    scales = (torch.rand(k // group, n, generator=gen, device=device) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 16, (k // group, n), generator=gen, device=device).half()
    qweight = pack_for_kernel(codes, 4)
    x = torch.randn(3, k, generator=gen, device=device).bfloat16()
    assert not ws.ws_supported(x, qweight, None, 4, group)
    plan = GemmPlan(16, 64, False, 2, 2, 4, 4, swap_ab=True, pairs=True, ws=True)
    got = gptq_gemm(x, qweight, scales, zeros, None, None, 4, group, plan)
    ref = gptq_gemm_reference(x.float(), qweight, scales, zeros, None, None, 4, group)
    assert (got.float() - ref).abs().max() <= 0.01 * ref.abs().max()
    prefill = GemmPlan(128, 64, False, 1, 4, 4, 3, swap_ab=True, pairs=True, ws=True, maxnreg=128)  # runs the block kernel
    rows = torch.randn(130, k, generator=gen, device=device).bfloat16()
    got = gptq_gemm(rows, qweight, scales, zeros, None, None, 4, group, prefill)
    ref = gptq_gemm_reference(rows.float(), qweight, scales, zeros, None, None, 4, group)
    assert (got.float() - ref).abs().max() <= 0.01 * ref.abs().max()
    needs = r"ws is a plan with a Triton twin: it needs swap_ab, pairs and block_m in \(16, 64, 128\)"
    with pytest.raises(ValueError, match=needs):
        gptq_gemm(x, qweight, scales, zeros, None, None, 4, group, GemmPlan(16, 64, False, 2, 2, 4, 4, ws=True))


def test_sweep_offers_gluon_plans_at_every_size():
    from folovllm.benchmarks.gptq import sweep_plans

    cpu = torch.device("cpu")
    decode = [p for p in sweep_plans(1, 4096, 6144, 4, 132, cpu) if p.ws]
    assert decode and {p.maxnreg for p in decode} == {80, 64, 48} and all(p.swap_ab and p.pairs for p in decode)
    wide = [p for p in sweep_plans(64, 4096, 6144, 4, 132, cpu) if p.ws]
    assert wide and all(p.block_m == 64 and p.swap_ab and p.pairs for p in wide)
    assert {(p.block_n, p.num_warps, p.maxnreg) for p in wide} == {(64, 4, 96), (64, 4, 128), (128, 8, 128)}
    prefill = [p for p in sweep_plans(256, 4096, 6144, 4, 132, cpu) if p.ws]
    assert {(p.block_m, p.split_k, p.blocks_per_split) for p in prefill} == {(128, 1, 32)}
    assert len(prefill) == 15 and {(p.block_n, p.num_warps) for p in prefill} == {(128, 8), (256, 8), (128, 4)}


def test_h200_table_holds_gluon_plans_with_register_caps():
    """The seventeenth session's probe (``m7_ws_decode.py --tune``) put Gluon plans in the H200 table where they beat
    the tuned Triton plans by 2% or more, and later sweeps kept them; they load as ``GemmPlan``s with their register
    caps."""
    from folovllm.model_executor.layers.quantization.ops.gptq_gemm import TUNED, tuned_key

    plans = TUNED.plans("NVIDIA H200")
    gluon = {key: plan for key, plan in plans.items() if plan.ws}
    assert tuned_key(4, 1, 4096, 24576) in gluon and gluon[tuned_key(4, 1, 4096, 24576)].maxnreg in (80, 64, 48)
    assert all(plan.block_m in (16, 64, 128) and plan.swap_ab and plan.pairs for plan in gluon.values())
    shapes = ((4096, 6144), (4096, 4096), (4096, 24576), (12288, 4096))
    # the twentieth session's sweep at 64 rows (M7-wide-sweep-h200.json): two warpgroups, every row in one product
    assert all(gluon[tuned_key(4, 64, k, n)].block_m == 64 and gluon[tuned_key(4, 64, k, n)].num_warps == 8
               for k, n in shapes)  # fmt: skip
    # the twenty-fifth session's (M7-prefill-ws2-h200.json): tiles of 128 rows above 64, 256 columns above 1024
    assert all(gluon[tuned_key(4, m, k, n)].block_m == 128 for m in (256, 4096) for k, n in shapes)
    assert all(gluon[tuned_key(4, 4096, k, n)].block_n == 256 for k, n in shapes)


@pytest.mark.skipif(not HOPPER, reason="Gluon's warp-specialized kernel runs on Hopper GPUs only")
@pytest.mark.parametrize("m", [1, 6, 16, 17, 40, 64])
def test_gptq_gemm_runs_a_ws_plan_on_gluon(m, monkeypatch):
    """A ``ws`` plan reaches the Gluon kernel through ``gptq_gemm`` (the Triton twin is never launched) and equals the
    reference, with the fewest rows per product (8, 16, 32 or 64) that hold X."""
    from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops

    gen = torch.Generator(device="cuda").manual_seed(m)
    k, n = 1024, 256
    qweight, scales, zeros = _cuda_layer(k, n, 4, 128, gen)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    monkeypatch.setattr(ops, "launch_plan", lambda *args, **kwargs: pytest.fail("the Triton twin ran"))
    plan = ops.GemmPlan(16, 128, False, 2, 4, 4, 4, swap_ab=True, pairs=True, ws=True, maxnreg=64)
    if m > 16:
        plan = ops.GemmPlan(64, 64, False, 2, 4, 4, 4, swap_ab=True, pairs=True, ws=True, maxnreg=96)
    assert ops.as_ws_plan(plan, m).m_tile == next(t for t in (8, 16, 32, 64) if t >= m)
    got = ops.gptq_gemm(x, qweight, scales, zeros, None, None, 4, 128, plan)
    ref = gptq_gemm_reference(x.float(), qweight, scales, zeros, None, None, 4, 128)
    assert (got.float() - ref).abs().max() <= 0.01 * ref.abs().max()


def test_untuned_prefill_on_hopper_defaults_to_the_gluon_kernel(monkeypatch):
    """Shapes the table has no plan for: above 64 rows a Hopper GPU gets the Gluon kernel in 128-row tiles (128
    columns up to 1024 rows, 256 above), what the H200 sweep chose on every tuned shape; other GPUs, and 17-64 rows,
    keep whole blocks."""
    from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    for capability, m, want in ((9, 65, (True, 128)), (9, 4096, (True, 256)), (9, 40, (False, 128)), (8, 300, (False, 128))):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: (c, 0))
        ops.plan_gptq_gemm.cache_clear()
        plan = ops.plan_gptq_gemm(m, 576, 2048, 4, torch.device("cuda"))
        assert (plan.ws, plan.block_n) == want and plan.block_dot != plan.ws and plan.split_k == 1
    ops.plan_gptq_gemm.cache_clear()


@pytest.mark.skipif(not HOPPER, reason="Gluon's warp-specialized kernel runs on Hopper GPUs only")
@pytest.mark.parametrize("m", [65, 700, 1500])
def test_untuned_prefill_runs_gluon_and_equals_the_reference(m, monkeypatch):
    """A shape the table has no plan for (576 columns, 17 K blocks), above 64 rows: ``gptq_gemm`` reaches the Gluon
    kernel by default (no Triton kernel is launched) and equals the reference."""
    from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops

    gen = torch.Generator(device="cuda").manual_seed(m)
    k, n = 17 * 128, 576
    qweight, scales, zeros = _cuda_layer(k, n, 4, 128, gen)
    x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
    monkeypatch.setattr(ops, "launch_plan", lambda *args, **kwargs: pytest.fail("a Triton kernel ran"))
    got = ops.gptq_gemm(x, qweight, scales, zeros, None, None, 4, 128)
    ref = gptq_gemm_reference(x.float(), qweight, scales, zeros, None, None, 4, 128)
    assert (got.float() - ref).abs().max() <= 0.01 * ref.abs().max()


@pytest.mark.skipif(not HOPPER, reason="Gluon's warp-specialized kernel runs on Hopper GPUs only")
@pytest.mark.parametrize("count", [2, 4, 12])
def test_pdl_launch_after_a_norm_reads_the_norms_output_in_a_cuda_graph(count):
    """RMSNorm (which lets the next kernel start at once) then the kernel launched with PDL, whose weights stream
    before the norm has ended: captured in a CUDA graph and replayed on new inputs, the product is bit-identical
    to the same kernels without PDL, for programs of fewer, as many and more K blocks than ring stages."""
    from folovllm.model_executor.layers.ops.rms_norm import rms_norm
    from folovllm.triton_utils.pdl import without_pdl

    gen = torch.Generator(device="cuda").manual_seed(count)
    k, n = count * 128 * 2, 512
    qweight, scales, zeros = _cuda_layer(k, n, 4, 128, gen)
    weight = torch.rand(k, device="cuda", generator=gen).bfloat16()
    x = torch.empty(1, k, device="cuda", dtype=torch.bfloat16)
    plan = ws.WsPlan(128, 2, 4)

    def step() -> torch.Tensor:
        return ws.launch_gptq_decode_ws(rms_norm(x, weight, 1e-6), qweight, scales, zeros, None, 4, 128, plan)

    x.copy_(torch.randn(1, k, device="cuda", generator=gen))
    step()  # compile and allocate the split-K counters outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        x.copy_(torch.randn(1, k, device="cuda", generator=gen) * 4)
        graph.replay()
        with without_pdl():
            want = step()
        assert torch.equal(out, want)
        ref = gptq_gemm_reference(rms_norm(x, weight, 1e-6).float(), qweight, scales, zeros, None, None, 4, 128)
        assert (out.float() - ref).abs().max() <= 0.01 * ref.abs().max()


@pytest.mark.skipif(not HOPPER, reason="Gluon's warp-specialized kernel runs on Hopper GPUs only")
def test_gptq_engine_on_the_gluon_kernels_generates_the_reference_tokens(monkeypatch):
    """The whole M7 engine on the GPU: Qwen3-8B's layer shapes (two layers, random 4-bit codes), so the tuned table
    applies. Prompts of 300, 150, 90 and 20 tokens prefill in chunked steps of more than 64 rows (the Gluon prefill
    plans) and decode steps replay CUDA graphs of the Gluon decode plans (PDL on). The greedy tokens equal those of the
    same engine with every projection run by the dequantize-then-matmul reference (fp32 weights and products)."""
    import gc

    from folovllm import LLM, SamplingParams
    from folovllm.model_executor.layers.quantization import gptq as gptq_method
    from folovllm.model_executor.layers.quantization.ops import gptq_gemm as ops

    rows: list[int] = []
    launch = ops.launch_gptq_decode_ws
    monkeypatch.setattr(ops, "launch_gptq_decode_ws", lambda x, *args: rows.append(x.shape[0]) or launch(x, *args))
    prompts = [{"prompt_token_ids": [(13 * i + 7 * j) % 5000 + 11 for j in range(length)]}
               for i, length in enumerate((300, 150, 90, 20))]  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def generate() -> list[list[int]]:
        llm = LLM("random:qwen3-8b", milestone="M7", quantization="gptq", hf_overrides={"num_hidden_layers": 2},
                  max_model_len=512, kv_cache_memory=2**28, max_num_seqs=8, max_num_batched_tokens=256)  # fmt: skip
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        return tokens

    kernels = generate()
    assert any(m > ws.WS_MAX_M for m in rows) and any(m <= 16 for m in rows), sorted(set(rows))
    monkeypatch.setattr(gptq_method, "launch_gptq_gemm", lambda x, *args: gptq_gemm_reference(x, *args))
    rows.clear()
    reference = generate()
    assert not rows
    assert kernels == reference
