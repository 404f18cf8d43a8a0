"""R1's ceiling: a plain Tornado hello-world ``RequestHandler`` app answering every POST with
``{"Success": true}``, as trackrelay answers an accepted event.

    python -m bench.hello --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench.serving import serve_until_signalled
from tornado.web import Application, RequestHandler


class HelloHandler(RequestHandler):
    def post(self, *_: Any) -> None:
        self.write({"Success": True})


async def serve(port: int) -> None:
    await serve_until_signalled(Application([(r"/.*", HelloHandler)]), port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
