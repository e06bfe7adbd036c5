"""mnist-ddp: the classic PyTorch MNIST tutorial as a correct DistributedDataParallel job."""
