"""The embedded model's world: the scenes and captions tiny-shapes is trained on (world.py) and the judge that reads
what a picture of it shows (judge.py). Below both training/ (which renders its data here) and pipelines/ (whose
Explain lab scores adherence with the judge); imports neither."""
