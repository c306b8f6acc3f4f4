"""The notebook helpers: real source, model fallback, committed results."""
from __future__ import annotations

from folovllm import book
from folovllm.core.block_pool import BlockPool


def test_show_source_slices_the_real_code():
    code = book.show_source(BlockPool.get_new_blocks, start="if num_blocks", end="return blocks")
    assert code.data.startswith("if num_blocks > self.num_free_blocks")
    assert code.data.endswith("return blocks")


def test_chapter_model_falls_back_without_smollm2(monkeypatch, capsys):
    monkeypatch.setenv("FOLOVLLM_NO_SMOLLM2", "1")
    assert not book.smollm2_available()
    assert book.chapter_model("random:tiny-llama") == "random:tiny-llama"
    assert "SmolLM2 is not installed here" in capsys.readouterr().out
    monkeypatch.delenv("FOLOVLLM_NO_SMOLLM2")
    assert book.chapter_model() == "smollm2-135m"


def test_load_results_reads_committed_json_with_provenance(capsys):
    results = book.load_results("M2-")
    assert results and all(r["benchmark"] == "throughput" for r in results)
    assert "commit" in capsys.readouterr().out


def test_run_async_works_inside_a_running_loop():
    import asyncio

    from folovllm.book import run_async

    async def inner() -> int:
        await asyncio.sleep(0)
        return 7

    async def outer() -> int:  # as in a notebook cell: a loop is already running here
        return run_async(inner())

    assert asyncio.run(outer()) == 7
