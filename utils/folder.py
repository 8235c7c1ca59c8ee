"""The files of a run folder (README "Monitoring and run folders"). Free of PyTorch: ``utils.results``
and ``utils.experiments`` read run folders without loading it."""
ARGS = "args.json"              # every resolved option, versions, how the run was started and resumed
SPLIT = "split.json"            # the labeled, unlabeled and validation indices
LOG = "log.txt"                 # one tab-separated row per epoch
SUMMARY = "summary.json"        # the protocol values, written when the last epoch is done
STATUS = "status.json"          # how each attempt ended: running, finished, interrupted, stopped
CHECKPOINT = "checkpoint.pth.tar"   # the full state after the last finished epoch
BEST = "model_best.pth.tar"         # the same at the best validation epoch

RUN_FILES = (ARGS, SPLIT, LOG, STATUS, CHECKPOINT, BEST, SUMMARY)  # what a finished run folder holds, besides events
