"""Shared-prefix throughput: prefix caching on against off, in one run (the paper's
Fig. 16, translation with one-shot and five-shot example prefixes).

Every request is a few-shot English-to-French translation prompt: an instruction and
1 or 5 example pairs (the shared prefix), then its own sentence. As in the paper, the
provider's prefix is in the cache before the measured requests arrive: each engine
first serves one warm-up request with the prefix (with caching off it gains nothing
from it, but does the same work). Then all requests are submitted at once and served
by the continuous-batching engine; throughput = requests / wall time. Outputs have a
fixed length (ignore_eos) so both settings do the same decode work. Both engines run
over one loaded model (the embedded SmolLM2 unless --model is given).

    python benchmarks/prefix_sharing.py [--requests 32] [--max-tokens 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import time

from harness import environment, write_json
from pagedserve import LLM, EngineConfig, SamplingParams
from pagedserve.engine.llm_engine import LLMEngine

INSTRUCTION = ("Translate English to French. Keep the meaning, the tone and the names; "
               "answer with the French sentence only.\n\n")
EXAMPLES = [
    ("The old fisherman repaired his nets every morning before the sun rose over the "
     "harbour, while the gulls circled above the quiet boats.",
     "Le vieux pêcheur réparait ses filets chaque matin avant que le soleil ne se lève "
     "sur le port, tandis que les mouettes tournaient au-dessus des bateaux silencieux."),
    ("Our train was delayed by two hours because of the snow, so we missed the concert "
     "and had dinner in a small restaurant near the station instead.",
     "Notre train a eu deux heures de retard à cause de la neige, alors nous avons manqué "
     "le concert et avons dîné dans un petit restaurant près de la gare."),
    ("The committee will publish its final report next month, after it has heard the "
     "testimony of the remaining witnesses and reviewed the financial records.",
     "Le comité publiera son rapport final le mois prochain, après avoir entendu les "
     "témoignages des derniers témoins et examiné les documents financiers."),
    ("My grandmother grows tomatoes, beans and lavender in her garden, and every summer "
     "she gives jars of jam to all the neighbours on her street.",
     "Ma grand-mère cultive des tomates, des haricots et de la lavande dans son jardin, "
     "et chaque été elle offre des pots de confiture à tous les voisins de sa rue."),
    ("If the weather is good tomorrow, the children want to walk along the river to the "
     "old mill and have a picnic under the chestnut trees.",
     "S'il fait beau demain, les enfants veulent marcher le long de la rivière jusqu'au "
     "vieux moulin et pique-niquer sous les châtaigniers."),
]
SENTENCES = [
    "The library closes at six on Saturdays.", "She bought a red bicycle for her son.",
    "We need more chairs for the meeting room.", "The museum is free on the first Sunday.",
    "He forgot his umbrella at the office again.", "The soup is too salty for me.",
    "Please send me the documents before Friday.", "The cat is sleeping on the warm roof.",
    "Our neighbours are moving to Lyon next week.", "The bakery on the corner sells fresh bread.",
    "I have never seen so many stars in the sky.", "The doctor will call you this afternoon.",
    "They painted the kitchen yellow last spring.", "The bus stops in front of the school.",
    "My brother plays the violin in an orchestra.", "The price of coffee went up this year.",
    "Can you recommend a good hotel in Paris?", "The garden needs water after this hot day.",
    "The students finished their exams yesterday.", "This road leads to a small village.",
    "The concert was cancelled because of the rain.", "She writes letters to her old friends.",
    "The shop will open a new branch in Nice.", "We watched the boats from the bridge.",
    "The teacher explained the lesson twice.", "His car broke down on the motorway.",
    "The children built a snowman in the park.", "I would like a table for four, please.",
    "The river flooded the fields last winter.", "Our flight leaves early in the morning.",
    "The farmer sells eggs at the Sunday market.", "The new bridge will open in May.",
]


def prompt(shots: int, sentence: str) -> str:
    examples = "".join(f"English: {en}\nFrench: {fr}\n\n" for en, fr in EXAMPLES[:shots])
    return f"{INSTRUCTION}{examples}English: {sentence}\nFrench:"


def measure(llm: LLM, shots: int, caching: bool, requests: int, max_tokens: int) -> dict:
    base = llm.engine.config
    config = EngineConfig(**{**base.__dict__, "enable_prefix_caching": caching})
    engine = LLMEngine(config, runner=llm.engine.runner, tokenizer=llm.engine.tokenizer)
    run = LLM.from_engine(engine)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    run.generate(prompt(shots, "Good morning."), params, use_tqdm=False)  # warm-up
    prompts = [prompt(shots, SENTENCES[i % len(SENTENCES)]) for i in range(requests)]
    t0 = time.perf_counter()
    outs = run.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    cached = sum(o.metrics.num_cached_tokens for o in outs)
    return {"shots": shots, "prefix_caching": caching, "seconds": seconds,
            "requests_per_s": requests / seconds, "prompt_tokens": prompt_tokens,
            "cached_prompt_tokens": cached,
            "prefix_tokens": len(llm.tokenizer(prompt(shots, ""))["input_ids"]),
            "outputs": [o.outputs[0].token_ids for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--out")
    args = ap.parse_args()
    llm = LLM(args.model, device="cpu", dtype="float32", num_kv_blocks=2048,
              max_num_batched_tokens=2048, swap_space_gb=0.01)
    results = []
    for shots in (1, 5):
        off = measure(llm, shots, False, args.requests, args.max_tokens)
        on = measure(llm, shots, True, args.requests, args.max_tokens)
        same = sum(a == b for a, b in zip(on["outputs"], off["outputs"]))
        on["identical_outputs"] = off["identical_outputs"] = same
        speedup = on["requests_per_s"] / off["requests_per_s"]
        for r in (off, on):
            r.pop("outputs")
            results.append(r)
        print(f"{shots}-shot (prefix {on['prefix_tokens']} tokens): "
              f"{off['requests_per_s']:.2f} req/s without caching, "
              f"{on['requests_per_s']:.2f} req/s with ({on['cached_prompt_tokens']} of "
              f"{on['prompt_tokens']} prompt tokens cached): {speedup:.2f}x; "
              f"{same}/{args.requests} outputs identical", flush=True)
    info = {"requests": args.requests, "max_tokens": args.max_tokens,
            "model": llm.engine.model_name, "environment": environment(), "results": results}
    write_json(args.out, info)


if __name__ == "__main__":
    main()
