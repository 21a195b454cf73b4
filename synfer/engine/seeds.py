"""Named seed streams: every random draw of synfer comes from (a seed, a stream's salt).

A sample's seed derives from (recipe seed, sample index) (`synfer.contract.labels.sample_seed`); each
use of it draws from its own stream, `numpy.random.default_rng([seed, salt])`, so adding a draw
to one stream never shifts another. The salts are fixed forever: changing one changes the
bytes of every dataset drawn with it (the shipped models were trained on those bytes).
Two streams may share a salt when their seeds never meet (a sample seed vs a benchmark seed).

torch draws are seeded without a salt list and stay where they are (changing them changes the
shipped outputs): the sd generator's initial noise from the sample seed, its DDIM eta noise
from seed + 1 and its non-finite retries from derived seeds (plugins/sd/generator.py);
FERAnno's capture noise from the sample seed (plugins/feranno/capture.py); the sd upscaler from
crc32(image) ^ seed (plugins/upscalers.py); template captions from crc32(key) ^ salt
(plugins/captioners.py).
"""
from __future__ import annotations

import numpy as np

STREAMS: dict[str, int] = {
    "plan.aus": 1,  # synfer.engine.pipeline.plan: the AU vector of a sample (FAU-FE prior)
    "prompt": 7,  # prompters: words and identity of a sample's prompt
    "layout.pick": 11,  # sd layout initialization: which FEText face a sample starts from
    "procedural.identity": 0x1D,  # procedural world: an identity from its seed
    "procedural.pose": 0x9E,  # procedural world: pose, lighting, AU14 side of a face
    "procedural.noise": 0x40,  # procedural world: sensor noise of a face
    "benchmark.real": 7,  # downstream benchmark: real subset and initialisation (benchmark seed)
    "benchmark.synthetic": 11,  # downstream benchmark: synthetic subset (benchmark seed)
}


def stream_rng(seed: int, stream: str):
    """`numpy.random.default_rng([seed, STREAMS[stream]])`: the generator of one named stream."""
    if stream not in STREAMS:
        raise KeyError(f"no seed stream {stream!r}; known: {', '.join(STREAMS)} (add new ones to synfer.engine.seeds.STREAMS)")
    return np.random.default_rng([int(seed), STREAMS[stream]])
