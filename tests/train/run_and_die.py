"""`python -m longjax.main` that sends itself a signal at a given step (for resume tests).

    python tests/train/run_and_die.py KILL 6 after_log --config=... --workdir=...

after_log:  right after step N's train metrics are written (log_every_steps=1),
            once the checkpoints already started are complete;
after_save: right after the checkpoint of step N was started, while its files
            are still being written in the background.
twice:      after_log at step N, and the signal again when the run, stopping,
            waits for the checkpoint that the first signal asked for (a
            second SIGTERM during the preemption save).
"""
import os
import runpy
import signal
import sys

from longjax.train import checkpointing
from longjax.train import metrics


def main():
  name, step, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  signum = getattr(signal, f'SIG{name}')
  sys.argv = ['longjax.main'] + sys.argv[4:]

  if when == 'twice':
    close = checkpointing.Checkpointer.close

    def signal_again_then_close(self):
      # The run is leaving with its preemption save still being written; the
      # close below waits for it.
      os.kill(os.getpid(), signum)
      close(self)

    checkpointing.Checkpointer.close = signal_again_then_close
    when = 'after_log'
  if when == 'after_log':
    write = metrics.MetricsWriter.write
    checkpointers = []
    init = checkpointing.Checkpointer.__init__

    def init_and_remember(self, *args, **kwargs):
      init(self, *args, **kwargs)
      checkpointers.append(self)

    def write_then_die(self, at_step, split, values):
      write(self, at_step, split, values)
      if at_step == step and split == 'train':
        for checkpointer in checkpointers:
          checkpointer.wait()
        os.kill(os.getpid(), signum)

    checkpointing.Checkpointer.__init__ = init_and_remember
    metrics.MetricsWriter.write = write_then_die
  elif when == 'after_save':
    save = checkpointing.Checkpointer.save

    def save_then_die(self, at_step, *args, **kwargs):
      started = save(self, at_step, *args, **kwargs)
      if at_step == step:
        os.kill(os.getpid(), signum)
      return started

    checkpointing.Checkpointer.save = save_then_die
  else:
    raise ValueError(when)
  runpy.run_module('longjax.main', run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main()
