"""A record that fails each time it is made (a kernel record that does not fit beside training: MemoryError) leaves
the run's progress savable and its report readable.

The analyzer makes a recorded step's records (snapshot, kernel record, log) again at its next opportunity when they
were cut off. Where the record fails every time, the next opportunity included the analyzer's ``state_dict()``
(so ``trainer.save_checkpoint()``) and ``report()``: both raised the record's error, and the run could neither be
saved nor read; the steps since the last checkpoint were lost. What must hold: the checkpoint is written, carrying
the owed records, and a run resumed from it (where the record fits) makes them at that step's ledger and θ, so it
ends bit for bit where the straight run does; ``report()`` reads the ledgers and names the records not made.
"""

import math

import pytest
import torch

from genkernel.diffusion import DDPMTrainer, MLPDenoiser, NoiseLevelAnalyzer, make_scheduler
from states import state_differences

F64 = torch.float64
T = 50


pytestmark = pytest.mark.usefixtures("one_thread")


def _ring(n, seed=0):
    angle = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 * math.pi
    return 2 * torch.stack([angle.cos(), angle.sin()], dim=1)


def _trainer(tmp_path=None):
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8).double()
    scheduler, data = make_scheduler(T), _ring(40)
    analyzer = NoiseLevelAnalyzer(scheduler, data[:8], num_bins=2, num_probes=4, kernel_points=2, progress=False,
                                  snapshot_every=2, kernel_every=2)
    kw = {} if tmp_path is None else {"checkpoint_dir": tmp_path}
    return DDPMTrainer(model, scheduler, data, batch_size=8, lr=1e-2, progress=False, callbacks=[analyzer], **kw), analyzer




def test_a_record_failing_each_time_leaves_the_run_savable_and_resumable(tmp_path):
    straight, straight_analyzer = _trainer()
    straight.train(4)
    trainer, analyzer = _trainer(tmp_path)
    trainer.train(1)

    def does_not_fit(model=None):
        raise MemoryError("the kernel record does not fit beside training")

    analyzer.kernel_structure = does_not_fit  # (step 2's kernel record, and every later try)
    with pytest.raises(MemoryError):
        trainer.train(3)
    assert trainer.global_step == 2 and analyzer.tracker.ledger.steps == 2
    report = analyzer.report()
    assert report["tracked_steps"] == 2
    assert any("tracked step 2" in note and "MemoryError" in note for note in report["notes"])
    path = trainer.save_checkpoint()  # the run's two updates are kept
    resumed, resumed_analyzer = _trainer(tmp_path)
    assert resumed.resume(path)
    resumed.train(2)
    assert [k["tracked_step"] for k in resumed_analyzer.kernel_history] == [0, 2, 4]
    assert state_differences(straight_analyzer.state_dict(), resumed_analyzer.state_dict()) == []
    assert state_differences(straight.state_dict(), resumed.state_dict()) == []
