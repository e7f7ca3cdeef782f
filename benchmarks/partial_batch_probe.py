"""python benchmarks/partial_batch_probe.py CHECKPOINT DATA_ROOT/cifar10 EPOCHS  (issue 23; benchmarks/RESULTS.md)

Paired probe: from a checkpoint, one epoch of the reference's loader (7 full batches + the partial one of 4
images) vs the same 7 batches alone (apr, drop_last) vs 7 + one more full batch. Test error at the end of each,
with the BatchNorm running statistics as trained and re-estimated on the clean training set."""
import sys, copy, torch, numpy as np
torch.set_num_threads(1)
from apr.models import create_model
from apr.data.cifar import load_cifar, TensorBatchLoader
from apr.augment import APRPolicy, split_apr_s_for_loader
from apr.inference import ImageClassifier
from apr.train import train_step
ck = torch.load(sys.argv[1], map_location='cpu', weights_only=False)
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
M, S = torch.tensor(MEAN).view(1,3,1,1), torch.tensor(STD).view(1,3,1,1)
xte, yte, _ = load_cifar(sys.argv[2], 'cifar10', train=False)
xtr, ytr, _ = load_cifar(sys.argv[2], 'cifar10', train=True)
t = torch.from_numpy(xte).permute(0, 3, 1, 2).float() / 255
ttr = torch.from_numpy(xtr).permute(0, 3, 1, 2).float() / 255
def err(model, reestimate=False):
    model = copy.deepcopy(model)
    if reestimate:
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.reset_running_stats(); mod.momentum = None
        model.train()
        with torch.inference_mode():
            for b in ttr.split(128): model((b - M) / S)
    model.eval()
    with torch.inference_mode():
        p = torch.cat([model((b - M) / S).argmax(1) for b in t.split(180)])
    return round(float((p.numpy() != yte).mean() * 100), 1)
m = create_model(ck['model_name'], 6); m.load_state_dict(ck['model'])
opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4); opt.load_state_dict(ck['optimizer'])
print('checkpoint', sys.argv[1], 'test error', err(m), flush=True)
pre_crop, pol = split_apr_s_for_loader(APRPolicy('apr_sp', p_prob=0.6, s_overflow='wrap', p_clamp=False))
clf = ImageClassifier(m, MEAN, STD, precision='fp32')
def step(c, o, x, y, seed):
    c.model.train(); train_step(c, o, x, y, policy=pol, generator=torch.Generator().manual_seed(seed))
for epoch in range(int(sys.argv[3])):
    loader = TensorBatchLoader(xtr, ytr, 128, train=True, seed=1000 + epoch, pad_fill=128, pre_crop=pre_crop, drop_last=False)
    batches = list(loader)
    for b, (x, y) in enumerate(batches[:7]):
        step(clf, opt, x, y, epoch * 100 + b)
    a = (err(clf.model), err(clf.model, True))
    c2, o2 = copy.deepcopy(clf), None
    o2 = torch.optim.SGD(c2.model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4); o2.load_state_dict(opt.state_dict())
    step(c2, o2, *batches[7], epoch * 100 + 7)
    p = (err(c2.model), err(c2.model, True))
    c3 = copy.deepcopy(clf)
    o3 = torch.optim.SGD(c3.model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4); o3.load_state_dict(opt.state_dict())
    xf, yf = next(iter(TensorBatchLoader(xtr, ytr, 128, train=True, seed=5000 + epoch, pad_fill=128, pre_crop=pre_crop)))
    step(c3, o3, xf, yf, epoch * 100 + 8)
    f = (err(c3.model), err(c3.model, True))
    print(f'epoch {epoch}: after 7 full steps {a}; + partial (4 images) {p}; + one more full {f}   (error %, (running BN, re-estimated BN))', flush=True)
    # the trajectory continues the reference's way (partial step included) so the next epoch starts like it
    clf, opt = c2, o2
