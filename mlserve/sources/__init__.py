"""Where models come from: pull (Hub, packages, local files) and recipes."""
