"""Studies run on the skill world: each tests one claim of a paper end to end (:mod:`.registry`).

The world itself (data, tokenizer, base model, skill LoRAs) is built by :mod:`lorafuse.skillworld`;
a study reads a built world and reports numbers as they come out.
"""
