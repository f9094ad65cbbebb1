"""Load a saved model directory with the real vLLM engine and generate (run as a script: vLLM spawns)."""

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    directory, max_len = sys.argv[1], int(sys.argv[2])
    llm = LLM(model=directory, dtype="float32", max_model_len=max_len, enforce_eager=True, gpu_memory_utilization=0.15)
    outputs = llm.generate(["The licence", "日本語"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    print("RESULT " + json.dumps([{"tokens": len(o.outputs[0].token_ids), "text": o.outputs[0].text} for o in outputs]))
