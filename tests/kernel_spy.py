"""A stand-in for a Triton kernel that records each launch's keyword arguments (the constexprs)."""


class KernelSpy:
    """Stands for a Triton kernel: ``spy[grid](*args, **kwargs)`` records ``kwargs`` in
    ``launches``, then launches the kernel itself."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch_
