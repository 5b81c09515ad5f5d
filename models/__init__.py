"""The model files that come with minidl, installed as the package `minidl_models` (setup.py), so the
built-in AlexNet is found wherever minidl is installed. Each is run by path, as any model file is."""
