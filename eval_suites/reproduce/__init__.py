"""The VL-SAE paper's POPE and CHAIR protocols as one command each, on data the user holds.

    python -m eval_suites.reproduce pope  --model PATH --questions vcd_random.jsonl \\
        --images DIR --out DIR
    python -m eval_suites.reproduce chair --model PATH --images val2014/ \\
        --annotations instances_val2014.json --synonyms synonyms.txt --out DIR

Every setting of a run (model, space, method, steering strengths, decoding, seed, prompts, data
files) is written beside its scores. See docs/reproduce.md.
"""
