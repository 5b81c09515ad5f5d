"""ReLU."""
from minidl.core import Function


class ReLU(Function):
    def forward(self, x):
        y = self.device.xp.maximum(x, 0)
        self.save(y)
        return y

    def backward(self, gy):
        (y,) = self.saved
        return gy * (y > 0)


def relu(x):
    return ReLU()(x)
