"""The paper's three tools as OpenAI function schemas, the form the Qwen3-VL chat template lists them in."""

IMAGE_ZOOM_IN = {
    "type": "function",
    "function": {
        "name": "image_zoom_in",
        "description": "Crop a region of an image and enlarge it, to look at small details.",
        "parameters": {
            "type": "object",
            "properties": {
                "bbox_2d": {
                    "type": "array",
                    "items": {"type": "number"},
                    "minItems": 4,
                    "maxItems": 4,
                    "description": "[x1, y1, x2, y2] in relative coordinates 0-1000 of the image.",
                },
                "label": {"type": "string", "description": "What the region shows."},
                "img_idx": {"type": "integer", "description": "Index of the image in the conversation.",
                            "default": 0},
            },
            "required": ["bbox_2d", "label"],
        },
    },
}

PYTHON = {
    "type": "function",
    "function": {
        "name": "python",
        "description": (
            "Run Python code in a stateful Jupyter kernel. The conversation's images are preloaded as "
            "`_pil_images` (PIL) and `_images` (paths); stdout, stderr and plt.show() figures come back."
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "code": {"type": "string", "description": "The code to run."},
                "timeout": {"type": "integer", "description": "Seconds before the run is stopped.", "default": 12},
            },
            "required": ["code"],
        },
    },
}

SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web (or the configured offline corpus) and return the top results.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "The search query."},
                "max_results": {"type": "integer", "description": "How many results to return.", "default": 5},
            },
            "required": ["query"],
        },
    },
}

ALL = {"image_zoom_in": IMAGE_ZOOM_IN, "python": PYTHON, "search": SEARCH}
