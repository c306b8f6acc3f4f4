"""The notebook helpers: real source, model fallback, committed results."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from folovllm import book
from folovllm.core.block_pool import BlockPool

ROOT = Path(__file__).resolve().parents[1]

SOURCE = """def schedule(self):
    budget = 8
    # region running requests
    for req in self.running:
        take(req)
    # endregion
    # region M5: chunked prefill
    chunk(req)
    # endregion
    return budget
"""


def test_show_source_is_the_real_code():
    code = book.show_source(BlockPool.get_new_blocks)
    assert code.data.startswith("    def get_new_blocks(self, num_blocks: int)")
    assert "self.free_block_queue.popleft()" in code.data


def test_regions_anchor_excerpts_on_names_and_elide_later_chapters():
    assert book.render_regions(SOURCE, region="running requests") == "for req in self.running:\n    take(req)\n"
    shown = book.render_regions(SOURCE, as_of="M2")
    assert "# … M5 adds chunked prefill here\n" in shown and "chunk(req)" not in shown
    assert "# region" not in shown and "# endregion" not in shown
    assert "chunk(req)" in book.render_regions(SOURCE, as_of="M5") and "chunk(req)" in book.render_regions(SOURCE)


def test_bad_regions_are_reported():
    import pytest

    with pytest.raises(ValueError, match="no region 'nope' in this source"):
        book.render_regions(SOURCE, region="nope")
    with pytest.raises(ValueError, match="region 'x' is never closed"):
        book.render_regions("# region x\nf()\n")
    with pytest.raises(ValueError, match="'# endregion' without a '# region'"):
        book.render_regions("f()\n# endregion\n")


def test_chapter_model_falls_back_without_smollm2(monkeypatch, capsys):
    monkeypatch.setenv("FOLOVLLM_NO_SMOLLM2", "1")
    assert not book.smollm2_available()
    assert book.chapter_model("random:tiny-llama") == "random:tiny-llama"
    assert "SmolLM2 is not installed here" in capsys.readouterr().out
    monkeypatch.delenv("FOLOVLLM_NO_SMOLLM2")
    assert book.chapter_model() == "smollm2-135m"


def test_load_results_reads_committed_json_with_provenance(capsys):
    results = book.load_results("M2-h200")  # not M2-curve (bench serve)
    assert results and all(r["benchmark"] == "throughput" for r in results)
    assert "commit" in capsys.readouterr().out
    prefill = book.load_results("M4-prefill", benchmark="prefill_attention")  # not M4-prefill-step (bench step)
    assert prefill and all(r["benchmark"] == "prefill_attention" for r in prefill)
    assert "M4-prefill-step" not in capsys.readouterr().out


def test_run_async_works_inside_a_running_loop():
    async def inner() -> int:
        await asyncio.sleep(0)
        return 7

    async def outer() -> int:  # as in a notebook cell: a loop is already running here
        return book.run_async(inner())

    assert asyncio.run(outer()) == 7


def test_every_figure_a_chapter_draws_is_committed():
    """A chapter executed with ``MPLBACKEND=Agg`` and no ``%matplotlib inline`` stores no figures, and strict
    nbval cannot notice (the cells still run). Every cell that calls ``plt.show()`` must carry an image."""
    import json

    missing = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            if cell["cell_type"] == "code" and "plt.show()" in "".join(cell["source"]):
                if not any("image/png" in out.get("data", {}) for out in cell.get("outputs", [])):
                    missing.append(f"{path.name} cell {i}")
    assert not missing, "cells that draw a figure but have none committed: " + ", ".join(missing)


def test_byte_tokenizer_lets_a_random_model_take_text_prompts():
    """Chapters build text prompts; on a machine without SmolLM2 the random model gets the byte stand-in
    through ``LLM.set_tokenizer`` (vLLM's API), and text prompts, output text and chat templates work."""
    from folovllm import LLM, SamplingParams

    tok = book.ByteTokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "héllo"}], add_generation_prompt=True)
    assert text == "<|user|>\nhéllo\n<|assistant|>\n" and tok.decode(tok(text).input_ids) == text
    assert tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=True) == tok("<|user|>\na\n").input_ids
    llm = LLM("random:tiny-qwen3", device="cpu", dtype="float32", max_model_len=64, kv_cache_memory=2**20)
    assert llm.get_tokenizer() is None
    with pytest.raises(ValueError, match="has no tokenizer"):
        llm.generate("hi", use_tqdm=False)
    llm.set_tokenizer(tok)
    out = llm.generate(text, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt_token_ids == tok(text).input_ids and len(out.outputs[0].token_ids) == 6
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)
