"""The embedded testbed: a deterministic synthetic world written as WebDataset shards in the CLIP_benchmark layout
(``world``), a tiny CLIP pretrained on its image-caption pairs (``tiny_clip``), and the testbed's settings read from
``configs/testbed/`` (``configs``)."""
