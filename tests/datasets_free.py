"""A tiny in-memory causal-LM dataset for Trainer tests (no `datasets` dependency)."""
import torch


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=12, vocab=256):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_dataset():
    return _Tokens()
