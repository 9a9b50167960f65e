"""ClientApp: tiny BERT trained from the global adapter, seeded by (round, partition)."""
import torch

from flower_dp_app import make_client_app

app = make_client_app(torch.bfloat16, [], {})
