"""TCDCNN, the L2I authors' AFLW landmark network (docs/models.md §2).

Input N×1×60×60 grayscale in [0, 1], output N×10 normalised coordinates ``[x0,y0,…,x4,y4]``.
Kept as in the authors' code: HardTanh (not tanh) after every conv, no activation between the two
linear layers, default PyTorch init everywhere (docs/faithfulness.md §1.8). The authors' dropout (p = 0.5)
is only applied behind an "unlabeled" flag that no script ever sets, so it is left out entirely;
without BN or dropout, train and eval mode compute the same function. 285 586 parameters.
"""
import torch.nn as nn


class TCDCNN(nn.Module):
    def __init__(self, num_outputs=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.Hardtanh(), nn.MaxPool2d(2),   # 60 → 56 → 28
            nn.Conv2d(20, 48, 5), nn.Hardtanh(), nn.MaxPool2d(2),  # 28 → 24 → 12
            nn.Conv2d(48, 64, 3), nn.Hardtanh(), nn.MaxPool2d(2),  # 12 → 10 → 5
            nn.Conv2d(64, 80, 3), nn.Hardtanh(),                   # 5 → 3
        )
        self.fc1 = nn.Linear(80 * 3 * 3, 256)
        self.fc2 = nn.Linear(256, num_outputs)

    def forward(self, x):
        # No non-linearity between fc1 and fc2: the authors' head is two stacked linear maps.
        return self.fc2(self.fc1(self.features(x).flatten(1)))
