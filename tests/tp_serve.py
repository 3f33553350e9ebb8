"""Serve a checkpoint on the vLLM CPU engine at a tensor-parallel size and write what
it computed as JSON: per prompt the token ids, greedy generation with log-probs and
the prompt's log-probs. Run as a script by the tests (one engine per process): a TP
engine starts worker processes, each rank pinned to its own core
(``VLLM_CPU_OMP_THREADS_BIND``; vLLM's default binding wants one NUMA node per rank).

    python tests/tp_serve.py CKPT TP OUT.json [--dtype float32] [--ids IDS.json]
        [--max-tokens 8] [--record DIR]

``--ids``: a JSON list of token-id lists (default: ``plugin_support.PROMPTS`` as text).
``--record``: every runtime quantizer call of the engine's processes is written to DIR
(tests/quantizer_alignment.py; the processes are spawned, so tests/record_site/
sitecustomize.py installs the recorder in each), the start-up's calls removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt")
    p.add_argument("tp", type=int)
    p.add_argument("out")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ids")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--record")
    a = p.parse_args(argv)
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if a.tp > 1:
        cores = os.cpu_count() or 1
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(r % cores) for r in range(a.tp))
    if a.record:
        shutil.rmtree(a.record, ignore_errors=True)
        Path(a.record).mkdir(parents=True)
        site = str(Path(__file__).with_name("record_site"))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [site, *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        os.environ["SCALESWEEP_TEST_RECORD"] = str(Path(a.record).resolve())
    import vllm
    from plugin_support import PROMPTS

    llm = vllm.LLM(
        a.ckpt,
        quantization="scalesweep",
        enforce_eager=True,
        dtype=a.dtype,
        max_model_len=256,
        kv_cache_memory_bytes=64 << 20,
        seed=0,
        tensor_parallel_size=a.tp,
        distributed_executor_backend="mp" if a.tp > 1 else None,
    )
    if a.record:  # the start-up's dummy and profiling runs
        for f in Path(a.record).glob("*.pt"):
            f.unlink()
    if a.ids:
        prompts = [{"prompt_token_ids": r} for r in json.loads(Path(a.ids).read_text())]
    else:
        prompts = PROMPTS
    sp = vllm.SamplingParams(
        temperature=0.0, max_tokens=a.max_tokens, logprobs=0, prompt_logprobs=0
    )
    outs = llm.generate(prompts, sp)
    rows = []
    for o in outs:
        c = o.outputs[0]
        ids = list(o.prompt_token_ids)
        rows.append(
            {
                "prompt": ids,
                "gen": list(c.token_ids),
                "gen_lp": [d[t].logprob for d, t in zip(c.logprobs, c.token_ids, strict=True)],
                "prompt_lp": [
                    lp[t].logprob for lp, t in zip(o.prompt_logprobs[1:], ids[1:], strict=True)
                ],
            }
        )
    Path(a.out).write_text(json.dumps(rows))
    # Stop the engine's processes now, then leave without running interpreter-exit
    # destructors: vllm-cpu 0.32 sometimes aborts there ("terminate called without an
    # active exception", SIGABRT) after all work is done and written.
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
