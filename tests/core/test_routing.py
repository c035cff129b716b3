import pytest

from nmi.routing import Route, canonical, classify


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/metadata/identity/oauth2/token", Route.TOKEN),
        ("/metadata/identity/oauth2/token/", Route.TOKEN),
        ("/Metadata/identity/oauth2/token", Route.TOKEN),
        ("/METADATA/identity/oauth2/token", Route.TOKEN),
        ("/metadata/Identity/oauth2/token", Route.INVALID_TOKEN),
        ("/metadata/identity/oauth2/tokenXYZ", Route.INVALID_TOKEN),
        ("/metadata/identity/oauth2/token/anything", Route.INVALID_TOKEN),
        ("/metadata/identity\\oauth2\\token", Route.INVALID_TOKEN),
        ("/metadata/identity/\\oauth2\\token/", Route.INVALID_TOKEN),
        ("/metadata/identity%5Coauth2%5Ctoken", Route.INVALID_TOKEN),
        ("/metadata/identity/oauth2%2Ftoken", Route.INVALID_TOKEN),
        ("/host/token", Route.HOST_TOKEN),
        ("/host/token/", Route.HOST_TOKEN),
        ("/metadata/instance", Route.INSTANCE),
        ("/Metadata/instance/", Route.INSTANCE),
        ("/metadata/instance/compute", Route.INSTANCE),
        ("/metadata/instancefoo", Route.INSTANCE),
        ("/metadata/", Route.PROXY),
        ("/metadata/scheduledevents", Route.PROXY),
        ("/doesnotexist", Route.PROXY),
        ("/metadata//instance", Route.NON_CANONICAL),
        ("/metadata/./instance", Route.NON_CANONICAL),
        ("/metadata/../metadata/instance", Route.NON_CANONICAL),
        ("/metadata/%2e%2e/x", Route.NON_CANONICAL),
        ("/metadata/a%00b", Route.NON_CANONICAL),
        ("metadata/instance", Route.NON_CANONICAL),
        ("/a/b/..", Route.NON_CANONICAL),
        ("/foo/metadata/identity/oauth2/token", Route.INVALID_TOKEN),
        # Double encoding: a second decoder upstream would see another path.
        ("/metadata/identity/oauth2/%2574oken", Route.NON_CANONICAL),
        ("/metadata/%2569nstance/compute", Route.NON_CANONICAL),
    ],
)
def test_classify(path: str, route: Route) -> None:
    assert classify(path) is route


def test_canonical_keeps_trailing_slash_and_decodes() -> None:
    assert canonical("/metadata/") == "/metadata/"
    assert canonical("/a%20b/") == "/a b/"
    assert canonical("/a//b") is None


def test_invalid_utf8_escape_is_refused() -> None:
    assert classify("/metadata/%ff%fe") is Route.NON_CANONICAL
