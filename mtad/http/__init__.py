"""HTTP: the public app (`/healthz`; later `/v1`, tracking, `/metrics`) and the admin control API, on aiohttp."""
