"""The device/cloud split: an HTTP server hosting the cloud model, and device-side clients."""
