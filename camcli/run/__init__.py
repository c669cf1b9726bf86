"""How a request runs: one typed plan (`plan`), pure per-image stages (`stages`), and the
engines that drive them: `local` (threads in this process, the default) and `ray`
(Ray Data actors, `--engine ray`). Importing this package loads no torch."""
