"""Text memory from documents and class names, as the MML reference code builds it.

:func:`split_document` turns an article (e.g. a Wikipedia page) into memory
sentences: the "References", "External links", "Further reading" and
"Bibliography" sections are dropped, each sentence becomes one item and is
truncated to 75 words (CLIP's text encoder reads at most 77 tokens).
:func:`fill_templates` fills a class name into CLIP's 80 ImageNet prompt
templates, the other half of the reference's text memory and the prompts of
the zero-shot CLIP baseline.
"""

import re

__all__ = ["IMAGENET_TEMPLATES", "DROPPED_SECTIONS", "split_document", "fill_templates"]

DROPPED_SECTIONS = ("references", "external links", "further reading", "bibliography")

#: CLIP's 80 ImageNet prompt templates (Radford et al. 2021), ``{}`` is the class name.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9])")


def _heading(line):
    """(level, title) of a section heading line, or None.

    Headings are MediaWiki's ``== Title ==`` or, in plain-text dumps, a short
    line that is exactly a known section name.
    """
    match = _HEADING.match(line)
    if match:
        return len(match.group(1)), match.group(2)
    if line.strip().lower().rstrip(":") in DROPPED_SECTIONS:
        return 2, line.strip().rstrip(":")
    return None


def _sentences(line):
    """Cut a paragraph after each . ! or ? (and closing quotes) that a capital follows."""
    start = 0
    for end in _SENTENCE_END.finditer(line):
        yield line[start:end.end()]
        start = end.end()
    yield line[start:]


def split_document(text, max_words=75):
    """Split a document into memory sentences.

    Parameters
    ----------
    text : str
        The document; paragraphs are separated by newlines and sections may
        start with MediaWiki headings (``== References ==``).
    max_words : int, default=75
        Each sentence is cut to its first ``max_words`` words.

    Returns
    -------
    sentences : list of str
        One item per sentence, headings and the dropped sections removed.

    Examples
    --------
    >>> from skmml.memory import split_document
    >>> doc = '''The tench is a fish. It lives in lakes!
    ... == References ==
    ... Smith (2001). Fish.'''
    >>> split_document(doc)
    ['The tench is a fish.', 'It lives in lakes!']
    """
    if not isinstance(text, str):
        raise TypeError(f"split_document() needs a str, got {type(text).__name__}.")
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}.")
    sentences, dropping_at = [], None
    for line in text.splitlines():
        heading = _heading(line)
        if heading is not None:
            level, title = heading
            if dropping_at is None or level <= dropping_at:
                dropping_at = level if title.lower() in DROPPED_SECTIONS else None
            continue
        if dropping_at is not None:
            continue
        for sentence in _sentences(line):
            words = sentence.split()
            if words:
                sentences.append(" ".join(words[:max_words]))
    return sentences


def fill_templates(class_name, templates=IMAGENET_TEMPLATES):
    """The prompts of a class: each template with ``{}`` replaced by `class_name`.

    Parameters
    ----------
    class_name : str
    templates : sequence of str, default=IMAGENET_TEMPLATES
        Format strings with one ``{}``.

    Returns
    -------
    prompts : list of str

    Examples
    --------
    >>> from skmml.memory import fill_templates
    >>> fill_templates("tench")[:2]
    ['a bad photo of a tench.', 'a photo of many tench.']
    """
    if not isinstance(class_name, str):
        raise TypeError(f"class_name must be a str, got {type(class_name).__name__}.")
    return [template.format(class_name) for template in templates]
