"""Azure OpenAI (deployment API): OpenAI's wire format with Azure's URLs and credential.

The route's `model` is the deployment name, which goes in the URL
(`{base}/openai/deployments/{deployment}/chat/completions?api-version=V`); the key goes in
`api-key`; the Responses API is `{base}/openai/responses?api-version=V` with the
deployment as the body's model. Error bodies, streams and usage are OpenAI's. (Azure's
newer v1 API, `{base}/openai/v1`, is plain OpenAI: use `protocol: openai` without a kind.)
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from proxy.dialects.openai import OpenAIDialect

_PATHS = {
    "chat.completions": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}


class AzureOpenAIDialect(OpenAIDialect):
    def __init__(self, api_version: str) -> None:
        self.api_version = api_version

    def upstream_headers(self, api_key: str | None) -> Mapping[str, str]:
        return {"api-key": api_key} if api_key else {}

    def upstream_url(self, base_url: str, endpoint: str, upstream_model: str, stream: bool, query: str) -> str:
        version = "?api-version=" + quote(self.api_version, safe="")
        base = base_url.rstrip("/") + "/openai"
        if endpoint not in _PATHS:   # the Responses API is not per deployment
            return base + "/responses" + version
        return f"{base}/deployments/{quote(upstream_model, safe='')}{_PATHS[endpoint]}{version}"

    def models_url(self, base_url: str) -> str:
        return base_url.rstrip("/") + "/openai/models?api-version=" + quote(self.api_version, safe="")
