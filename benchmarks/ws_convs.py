"""Time the forward and backward of the network's ten weight-standardized convs on tiny maps (the
filters' standardization and its backward dominate): how much a step spends standardizing filters.

    python benchmarks/ws_convs.py     # 3 rounds of 300 steps, channels_last filters as on a CPU
"""
import time, torch
from normlab.models import WSConv2d
torch.manual_seed(0)
shapes=[(3,16,3),(16,16,3),(16,32,1),(32,32,3),(32,32,3),(32,32,3),(32,24,1),(24,24,3),(24,24,3),(24,24,3)]
convs=[WSConv2d(i,o,k,padding=k//2,bias=False).to(memory_format=torch.channels_last) for i,o,k in shapes]
xs=[torch.randn(1,i,4,4).contiguous(memory_format=torch.channels_last) for i,o,k in shapes]
for r in range(3):
    t=time.perf_counter()
    for _ in range(300):
        sum(c(x).sum() for c,x in zip(convs,xs)).backward()
    print(round((time.perf_counter()-t)/300*1e3,2), 'ms per step (10 WS convs on 1x4x4 maps, fwd+bwd)')
