"""Layer objects: parameters, device placement, train/eval."""
from minidl.layers import init
from minidl.layers.branches import Branches
from minidl.layers.conv import Conv2d, stacked_conv2d
from minidl.layers.layer import Layer, Parameter, Sequential
from minidl.layers.linear import Linear
from minidl.layers.simple import LRN, Dropout, Flatten, MaxPool2d, ReLU, seed_dropout
from minidl.layers.summary import summary
