// Tests for the continuous-batching scheduler (scheduler/batch_scheduler.h) land with it.
