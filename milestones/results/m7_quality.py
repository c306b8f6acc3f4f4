"""M7 quality table: SmolLM2 perplexity (held-out Python docs) fp vs RTN vs GPTQ, with sample generations.

Run from the repository root (CPU, ~15 min on one busy core):
    OMP_NUM_THREADS=1 PYTHONPATH=src python3 milestones/results/m7_quality.py milestones/results/M7-quality-cpu.json
``--lm-head`` runs 4-bit g128 with and without ``lm_head`` quantized too (GPTQ and RTN) instead:
    OMP_NUM_THREADS=1 PYTHONPATH=src python3 milestones/results/m7_quality.py --lm-head milestones/results/M7-quality-lmhead-cpu.json
Every run starts from the same fp32 weights; quantized weights are applied dequantized in place
(``quantize_weights``), so 3-bit, which our kernel does not serve, is measured the same way.
"""
from __future__ import annotations

import sys
import time

import torch

from folovllm.attention.layer import prefill_metadata
from folovllm.benchmarks.common import provenance, save_json
from folovllm.config import ModelConfig
from folovllm.model_executor.model_loader import load_model
from folovllm.quantization.calibration import calibration_ids, evaluation_ids
from folovllm.quantization.perplexity import perplexity
from folovllm.quantization.quantize import quantize_weights

MAX_TOKENS, SEQ_LEN, CALIB = 4096, 512, (16, 256)
PROMPTS = ["def fibonacci(n):", "The capital of France is", "A list comprehension in Python"]
SETTINGS = [("rtn", 4, 128, False, False), ("gptq", 4, 128, False, False), ("rtn", 4, 32, False, False),
            ("gptq", 4, 32, False, False), ("gptq", 4, 128, True, False), ("rtn", 3, 128, False, False),
            ("gptq", 3, 128, False, False)]  # method, bits, group size, act-order, lm_head
LM_HEAD_SETTINGS = [("rtn", 4, 128, False, False), ("rtn", 4, 128, False, True), ("gptq", 4, 128, False, False),
                    ("gptq", 4, 128, False, True)]


@torch.inference_mode()
def greedy(model, ids: list[int], n: int) -> list[int]:
    """No-cache greedy decoding: one prefill of the whole sequence per token."""
    ids = list(ids)
    for _ in range(n):
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), prefill_metadata([len(ids)]))
        ids.append(int(model.compute_logits(hidden[-1:]).argmax()))
    return ids


def main(out: str, lm_head: bool = False) -> None:
    loaded = load_model(ModelConfig(model="smollm2-135m", device="cpu", dtype="float32"))
    model, tok = loaded.model, loaded.tokenizer
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    eval_ids = evaluation_ids(tok, loaded.hf_config.vocab_size, MAX_TOKENS)
    calib = calibration_ids(tok, loaded.hf_config.vocab_size, *CALIB)
    prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    rows = []
    for method, bits, group_size, desc_act, head in [("fp32", None, None, False, False),
                                                     *(LM_HEAD_SETTINGS if lm_head else SETTINGS)]:
        model.load_state_dict(fp_state)
        start = time.perf_counter()
        if method != "fp32":
            quantize_weights(model, method, bits, group_size, desc_act=desc_act,
                             calib=calib if method == "gptq" else None, lm_head=head)
        seconds = time.perf_counter() - start
        row = {"method": method, "bits": bits, "group_size": group_size, "desc_act": desc_act, "lm_head": head,
               "quantize_seconds": seconds, **perplexity(model, eval_ids, SEQ_LEN),
               "samples": [tok.decode(greedy(model, p, 20)) for p in prompt_ids]}
        print(row["method"], bits, group_size, desc_act, head, round(row["perplexity"], 3), flush=True)
        rows.append(row)
    fp = rows[0]["perplexity"]
    for row in rows:
        row["ppl_increase_pct"] = 100 * (row["perplexity"] / fp - 1)
    save_json(out, {"benchmark": "m7-quality", **provenance(torch.device("cpu"), "smollm2-135m", torch.float32),
                    "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python3 milestones/results/m7_quality.py "
                               + ("--lm-head " if lm_head else "") + out,
                    "milestone": "M7",
                    "model_note": "the embedded SmolLM2-135M comes from a Q4_1 GGUF: its 'fp32' is those weights "
                                  "dequantized (4-bit blocks of 32 with a float scale and minimum)",
                    "workload": {"eval": f"held-out pydoc_data.topics, first {MAX_TOKENS} tokens, windows of {SEQ_LEN}",
                                 "calibration": f"{CALIB[0]} x {CALIB[1]} tokens of the calibration split, seed 0",
                                 "sym": False, "damp_percent": 0.01, "prompts": PROMPTS},
                    "results": rows})


if __name__ == "__main__":
    main(sys.argv[-1], lm_head="--lm-head" in sys.argv[1:-1])
