"""Beyond one machine: batch prediction on Ray Data (ray_predict; needs `pip install 'ray[data]'`) and the
question and answer files it shares with the one-process `llavakit predict` (questions). Training across nodes
and serving many replicas need no code here: docs/scale.md."""
