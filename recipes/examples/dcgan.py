"""PyTorch's DCGAN example (``examples/dcgan/main.py``) with genkernel's GAN analyzer attached.

The flow is upstream's: ``Generator`` and ``Discriminator`` as there (transposed / strided
convolutions, BatchNorm in training mode, a Sigmoid at D's end), ``weights_init``, ``BCELoss``,
Adam (``--lr 0.0002 --beta1 0.5``), and per iteration a D step on a real batch and a generated batch
(two backwards into ``netD``'s gradients) followed by a G step that reuses the generated batch, with
``netD.zero_grad()`` / ``netG.zero_grad()`` as upstream; sample images every 100 iterations and
``netG_epoch_N.pth`` / ``netD_epoch_N.pth`` every epoch. What differs from upstream, so that it runs
offline and from a test:

- the data are a torchvision ``ImageFolder`` (``--dataset folder``, upstream's "folder" case) or
  ``FakeData`` (``--dataset fake``); no LSUN / CIFAR / MNIST downloads;
- the script is a function ``main(argv)`` returning the networks, optimizers and analyzer; the
  classes take ``nz``, ``ngf``, ``ndf``, ``nc`` as arguments instead of reading globals; ``--dataset``
  defaults to "folder" and ``--manualSeed`` to 0 (upstream: random);
- ``--cuda`` / ``--mps`` / ``--ngpu`` are as upstream; ``--dry-run`` runs one iteration.
- ``--dataroot`` is checked to be an ``ImageFolder`` before anything runs: a ValueError naming the option and the
  layout, where upstream fails inside torchvision.
- ``--imageSize`` other than 64 (the only size upstream's networks take) is a ValueError before anything runs,
  where upstream fails in D's first forward, inside torch.

The 15 lines marked ``# genkernel`` attach :class:`~genkernel.gan.GANKernelAnalyzer` to the loop
(docs/observing.md, "Observing a loop the user owns"): an import of ``genkernel.gan`` and one of
the report writers the accelerate scripts use (recipes/examples/checkpointing.py), on a GPU :func:`genkernel.set_exact_cuda_mode` (TF32 off, deterministic kernels,
analyzed or not, so that the two runs compare like for like), three options (``--analyze/--no-analyze``, ``--groups``, ``--probes``), a second
criterion with ``reduction="none"`` (the per-example losses; upstream's ``criterion`` still gives the
loss trained, their mean), the probes drawn from their own generator (training's random draws are
unchanged) and the analyzer built and bound, one ``observe_*`` line before each of the three
backwards, and the report written as strict JSON at the end (atomically: a run that fails there leaves an earlier
report whole). With ``--no-analyze`` the script is upstream's loop (it removes, with a warning, a report an earlier
run left in ``OUT``), and training is bit-for-bit the same with the analyzer (tests/test_dcgan_example.py).

    python -m recipes.examples.dcgan --dataroot DIR --outf OUT [--imageSize 64 --batchSize 64 --niter 25]

``DIR`` is an ``ImageFolder`` (one sub-folder of images per class). Writes upstream's
``real_samples.png``, ``fake_samples_epoch_NNN.png`` and ``net{G,D}_epoch_N.pth`` in ``OUT``, and
``OUT/genkernel_report.json`` (``analyzer.report()``).
"""

from __future__ import print_function

import argparse
import os
import random
from typing import Any, Sequence

import torch
import torch.backends.cudnn as cudnn
import torch.nn as nn
import torch.nn.parallel
import torch.optim as optim
import torch.utils.data
import torchvision.datasets as dset
import torchvision.transforms as transforms
import torchvision.utils as vutils

import genkernel.gan  # genkernel
from recipes.examples.checkpointing import SINGLE_PROCESS, drop_stale_report, write_report  # genkernel
from recipes.examples.checkpointing import check_image_folder


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (upstream's argument names)."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--dataset', default='folder', choices=['folder', 'fake'], help='folder (an ImageFolder) | fake')
    parser.add_argument('--dataroot', required=False, help='path to dataset')
    parser.add_argument('--workers', type=int, help='number of data loading workers', default=2)
    parser.add_argument('--batchSize', type=int, default=64, help='input batch size')
    parser.add_argument('--imageSize', type=int, default=64, help='the height / width of the input image to network')
    parser.add_argument('--nz', type=int, default=100, help='size of the latent z vector')
    parser.add_argument('--ngf', type=int, default=64)
    parser.add_argument('--ndf', type=int, default=64)
    parser.add_argument('--niter', type=int, default=25, help='number of epochs to train for')
    parser.add_argument('--lr', type=float, default=0.0002, help='learning rate, default=0.0002')
    parser.add_argument('--beta1', type=float, default=0.5, help='beta1 for adam. default=0.5')
    parser.add_argument('--cuda', action='store_true', default=False, help='enables cuda')
    parser.add_argument('--dry-run', action='store_true', help='check a single training cycle works')
    parser.add_argument('--ngpu', type=int, default=1, help='number of GPUs to use')
    parser.add_argument('--netG', default='', help="path to netG (to continue training)")
    parser.add_argument('--netD', default='', help="path to netD (to continue training)")
    parser.add_argument('--outf', default='.', help='folder to output images and model checkpoints')
    parser.add_argument('--manualSeed', type=int, default=0, help='manual seed')
    parser.add_argument('--mps', action='store_true', default=False, help='enables macOS GPU training')
    parser.add_argument('--analyze', action=argparse.BooleanOptionalAction, default=True, help='keep genkernel ledgers')  # genkernel
    parser.add_argument('--groups', type=int, default=4, help='discriminator-geometry groups of the analyzer')  # genkernel
    parser.add_argument('--probes', type=int, default=16, help='probe latents of the analyzer')  # genkernel
    return parser.parse_args(None if argv is None else list(argv))


# custom weights initialization called on netG and netD
def weights_init(m):
    classname = m.__class__.__name__
    if classname.find('Conv') != -1:
        torch.nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find('BatchNorm') != -1:
        torch.nn.init.normal_(m.weight, 1.0, 0.02)
        torch.nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self, ngpu, nz=100, ngf=64, nc=3):
        super(Generator, self).__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            # input is Z, going into a convolution
            nn.ConvTranspose2d(     nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            # state size. (ngf*8) x 4 x 4
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            # state size. (ngf*4) x 8 x 8
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            # state size. (ngf*2) x 16 x 16
            nn.ConvTranspose2d(ngf * 2,     ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            # state size. (ngf) x 32 x 32
            nn.ConvTranspose2d(    ngf,      nc, 4, 2, 1, bias=False),
            nn.Tanh()
            # state size. (nc) x 64 x 64
        )

    def forward(self, input):
        if input.is_cuda and self.ngpu > 1:
            output = nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        else:
            output = self.main(input)
        return output


class Discriminator(nn.Module):
    def __init__(self, ngpu, ndf=64, nc=3):
        super(Discriminator, self).__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            # input is (nc) x 64 x 64
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf) x 32 x 32
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*2) x 16 x 16
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*4) x 8 x 8
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*8) x 4 x 4
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
            nn.Sigmoid()
        )

    def forward(self, input):
        if input.is_cuda and self.ngpu > 1:
            output = nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        else:
            output = self.main(input)

        return output.view(-1, 1).squeeze(1)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train; returns ``{"netG", "netD", "optimizerG", "optimizerD", "analyzer" (or None), "iterations"}``."""
    opt = parse_args(argv)
    print(opt)
    # Upstream's networks take 64×64 images only (G always outputs 64×64; D's last 4×4 convolution needs a 64×64
    # input): any other size failed in D's first forward, inside torch, after the analyzer was built.
    if opt.imageSize != 64:
        raise ValueError(f"--imageSize {opt.imageSize}: the DCGAN networks here, as upstream's, take 64×64 images "
                         "only; pass --imageSize 64 (the images are resized and cropped to it)")
    if opt.dataset == 'folder' and opt.dataroot is not None:  # (torchvision's own error came from deep inside ImageFolder)
        check_image_folder(opt.dataroot, "--dataroot")

    try:
        os.makedirs(opt.outf)
    except OSError:
        pass

    if opt.manualSeed is None:
        opt.manualSeed = random.randint(1, 10000)
    print("Random Seed: ", opt.manualSeed)
    random.seed(opt.manualSeed)
    torch.manual_seed(opt.manualSeed)

    cudnn.benchmark = True
    if opt.cuda: genkernel.set_exact_cuda_mode()  # genkernel: TF32 off, deterministic, no autotuning; analyzed or not

    if torch.cuda.is_available() and not opt.cuda:
        print("WARNING: You have a CUDA device, so you should probably run with --cuda")

    if opt.dataroot is None and str(opt.dataset).lower() != 'fake':
        raise ValueError("`dataroot` parameter is required for dataset \"%s\"" % opt.dataset)

    if opt.dataset == 'folder':
        # folder dataset
        dataset = dset.ImageFolder(root=opt.dataroot,
                                   transform=transforms.Compose([
                                       transforms.Resize(opt.imageSize),
                                       transforms.CenterCrop(opt.imageSize),
                                       transforms.ToTensor(),
                                       transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                                   ]))
        nc = 3
    elif opt.dataset == 'fake':
        dataset = dset.FakeData(image_size=(3, opt.imageSize, opt.imageSize),
                                transform=transforms.ToTensor())
        nc = 3

    assert dataset
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=opt.batchSize,
                                             shuffle=True, num_workers=int(opt.workers))
    use_mps = opt.mps and torch.backends.mps.is_available()
    if opt.cuda:
        device = torch.device("cuda:0")
    elif use_mps:
        device = torch.device("mps")
    else:
        device = torch.device("cpu")

    ngpu = int(opt.ngpu)
    nz = int(opt.nz)
    ngf = int(opt.ngf)
    ndf = int(opt.ndf)

    netG = Generator(ngpu, nz, ngf, nc).to(device)
    netG.apply(weights_init)
    if opt.netG != '':
        netG.load_state_dict(torch.load(opt.netG))
    print(netG)

    netD = Discriminator(ngpu, ndf, nc).to(device)
    netD.apply(weights_init)
    if opt.netD != '':
        netD.load_state_dict(torch.load(opt.netD))
    print(netD)

    criterion = nn.BCELoss()
    per_example = nn.BCELoss(reduction='none')  # genkernel: the losses per example; their mean is criterion's

    fixed_noise = torch.randn(opt.batchSize, nz, 1, 1, device=device)
    real_label = 1
    fake_label = 0

    # setup optimizer
    optimizerD = optim.Adam(netD.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999))
    optimizerG = optim.Adam(netG.parameters(), lr=opt.lr, betas=(opt.beta1, 0.999))

    probes = torch.randn(opt.probes, nz, 1, 1, generator=torch.Generator().manual_seed(opt.manualSeed)).to(device)  # genkernel
    analyzer = genkernel.gan.GANKernelAnalyzer(netG, netD, probes, num_groups=opt.groups, generator_loss=genkernel.gan.GeneratorLoss(netD, output='probability')) if opt.analyze else None  # genkernel
    if analyzer: analyzer.bind(optimizerG, optimizerD)  # genkernel

    if opt.dry_run:
        opt.niter = 1

    iterations = 0
    for epoch in range(opt.niter):
        for i, data in enumerate(dataloader, 0):
            ############################
            # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z)))
            ###########################
            # train with real
            netD.zero_grad()
            real_cpu = data[0].to(device)
            batch_size = real_cpu.size(0)
            label = torch.full((batch_size,), real_label,
                               dtype=real_cpu.dtype, device=device)

            output = netD(real_cpu)
            errD_real = criterion(output, label)
            if analyzer: analyzer.observe_discriminator(per_example(output, label), label.long(), real_cpu)  # genkernel
            errD_real.backward()
            D_x = output.mean().item()

            # train with fake
            noise = torch.randn(batch_size, nz, 1, 1, device=device)
            fake = netG(noise)
            label.fill_(fake_label)
            output = netD(fake.detach())
            errD_fake = criterion(output, label)
            if analyzer: analyzer.observe_discriminator(per_example(output, label), label.long(), fake.detach())  # genkernel
            errD_fake.backward()
            D_G_z1 = output.mean().item()
            errD = errD_real + errD_fake
            optimizerD.step()

            ############################
            # (2) Update G network: maximize log(D(G(z)))
            ###########################
            netG.zero_grad()
            label.fill_(real_label)  # fake labels are real for generator cost
            output = netD(fake)
            errG = criterion(output, label)
            if analyzer: analyzer.observe_generator(per_example(output, label), noise, fake)  # genkernel
            errG.backward()
            D_G_z2 = output.mean().item()
            optimizerG.step()
            iterations += 1

            print('[%d/%d][%d/%d] Loss_D: %.4f Loss_G: %.4f D(x): %.4f D(G(z)): %.4f / %.4f'
                  % (epoch, opt.niter, i, len(dataloader),
                     errD.item(), errG.item(), D_x, D_G_z1, D_G_z2))
            if i % 100 == 0:
                vutils.save_image(real_cpu,
                        '%s/real_samples.png' % opt.outf,
                        normalize=True)
                fake = netG(fixed_noise)
                vutils.save_image(fake.detach(),
                        '%s/fake_samples_epoch_%03d.png' % (opt.outf, epoch),
                        normalize=True)

            if opt.dry_run:
                break
        # do checkpointing
        torch.save(netG.state_dict(), '%s/netG_epoch_%d.pth' % (opt.outf, epoch))
        torch.save(netD.state_dict(), '%s/netD_epoch_%d.pth' % (opt.outf, epoch))

    if analyzer: write_report(SINGLE_PROCESS, opt.outf, analyzer)  # genkernel: close the window in progress, write the report as strict JSON, atomically
    else: drop_stale_report(SINGLE_PROCESS, opt.outf)  # genkernel: an earlier run's report does not describe these networks
    return {"netG": netG, "netD": netD, "optimizerG": optimizerG, "optimizerD": optimizerD, "analyzer": analyzer,
            "iterations": iterations}


if __name__ == '__main__':
    main()
