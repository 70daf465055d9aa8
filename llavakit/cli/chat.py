"""`llavakit chat`: a multi-round conversation about an image, answers streamed as they are produced.

At a terminal it prompts with "USER: "; with piped stdin it reads one question per line, so it can be
scripted. Either way a bad line (an unreadable /image, a failed /save) prints one error line and the chat
goes on with the next. Commands: /image PATH switches the image (and starts over), /reset starts over, /save FILE
writes the conversation as JSON, Ctrl-D (end of input) exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llavakit.cli.checks import check_images, check_videos
from llavakit.cli.common import add_model_flags, add_sampling_flags, error_line, load_pipeline, number, sampling_kwargs

HELP = "chat about an image, several rounds, answers streamed"
EXAMPLE = """examples:
  llavakit chat --model llava-1.5-7b --image photo.jpg
  printf 'What is this?\\nWhat color is it?\\n' | llavakit chat --model DIR --image photo.jpg --temperature 0
commands inside the chat:
  /image PATH   switch to another image (starts a new conversation)
  /reset        start a new conversation
  /save FILE    write the conversation as JSON
  Ctrl-D        exit
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p, required=False)
    p.add_argument("--image", "--image-file", dest="images", action="append", default=[], metavar="PATH_OR_URL",
                   help="the image to talk about (repeatable for several images)")
    p.add_argument("--video", dest="videos", action="append", default=[], metavar="PATH_OR_URL",
                   help="a video to talk about (repeatable; LLaVA-NeXT-Video checkpoints)")
    p.add_argument("--video-frames", type=number(int, 1), metavar="N",
                   help="frames sampled uniformly from each video (default: the checkpoint's, else 32)")
    add_sampling_flags(p)


class ChatSession:
    """The conversation state: images, messages, and the commands that change them."""

    def __init__(self, pipe, images: list[str], sampling: dict, out=None, videos: list[str] = ()):
        self.pipe, self.sampling, self.out = pipe, sampling, out or sys.stdout  # stdout as it is now, not at import
        self.images, self.videos = list(images), list(videos)
        # Decoded once: a video costs far more to read than an image, and every turn would read it again.
        self.clips = pipe.processor.prepare_videos(self.videos)
        self.messages: list[dict[str, str]] = []

    def handle(self, line: str) -> None:
        """One line of input: a command or a question."""
        if line.startswith("/"):
            self.command(line)
        elif line.strip():
            self.ask(line.strip())

    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/reset":
            self.messages = []
            self.note("conversation reset")
        elif name == "/image" and arg:
            self.pipe.processor.prepare_images([arg])  # fail now, not at the next question
            self.images, self.messages = [arg], []
            self.note(f"image: {arg} (new conversation)")
        elif name == "/save" and arg:
            record = {"model": str(self.pipe.config.name_or_path), "template": self.pipe.template.name,
                      "images": [str(i) for i in self.images], "videos": [str(v) for v in self.videos],
                      "messages": self.messages}
            try:
                Path(arg).write_text(json.dumps(record, indent=2, ensure_ascii=False))
            except OSError as e:
                raise ValueError(f"/save {arg}: cannot write it ({e.strerror or e}); pick another file") from None
            self.note(f"saved to {arg}")
        else:
            self.note("commands: /image PATH, /reset, /save FILE; Ctrl-D exits")

    def ask(self, question: str) -> None:
        self.messages.append({"role": "user", "content": question})
        self.out.write("ASSISTANT: ")
        pieces = []
        try:
            for piece in self.pipe.stream_chat(self.messages, images=self.images, videos=self.clips, **self.sampling):
                pieces.append(piece)
                self.out.write(piece)
                self.out.flush()
        except BaseException:
            self.messages.pop()  # a failed turn leaves no half question behind
            raise
        self.out.write("\n")
        self.out.flush()
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})

    def note(self, text: str) -> None:
        print(f"[{text}]", file=sys.stderr)


def _lines(interactive: bool):
    while True:
        try:
            yield input("USER: ") if interactive else next(sys.stdin).rstrip("\n")
        except (EOFError, StopIteration):
            return


def run(args: argparse.Namespace) -> int:
    check_images(args.images)  # a bad image or video fails before the model loads
    check_videos(args.videos)
    pipe = load_pipeline(args)
    if args.images:
        pipe.processor.prepare_images(args.images)  # and one the model cannot take, before the first question
    session = ChatSession(pipe, args.images, sampling_kwargs(args), videos=args.videos)
    interactive = sys.stdin.isatty()
    if interactive:
        print("[type a question; /image PATH, /reset, /save FILE; Ctrl-D exits]", file=sys.stderr)
    for line in _lines(interactive):
        try:
            session.handle(line)
        except (ValueError, OSError) as e:  # a bad image, command or /save path: say so and go on, piped or not
            print(f"llavakit: error: {error_line(e)}", file=sys.stderr)
    return 0
