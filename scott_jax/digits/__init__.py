"""The embedded digits experiment: SCott end to end on real data, small enough for 2 CPU cores (mode digits).

Modules: `data` (sklearn digits, the tiny CLIP tokenizer and frozen random text encoder, diffusers folders),
`loop` (the resumable train loop), `teacher` (stage 1), `classifier` (the digit classifier), `evaluation`
(sampling rows and metrics) and `run` (the stages, resumption and report.md).
"""
