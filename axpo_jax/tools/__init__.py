"""Tools the agent calls: the protocol (base, protocol), the tools (image_zoom_in, python_tool, search), the
registry that lists them to the chat template, and the executor that turns every call into an observation."""
