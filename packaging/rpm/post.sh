# bypassd %post ($1: 1 = install, 2 = upgrade). Like %systemd_post, and it also
# starts the unit on first install when the preset enabled it (the .deb does the
# same). Upgrades restart it in %postun.
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    # Make the running bus load our policy before bypassd asks for its name.
    busctl call org.freedesktop.DBus /org/freedesktop/DBus org.freedesktop.DBus ReloadConfig >/dev/null 2>&1 || :
fi
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset bypassd.service >/dev/null 2>&1 || :
    if [ -d /run/systemd/system ] && systemctl --quiet is-enabled bypassd.service 2>/dev/null; then
        systemctl start bypassd.service >/dev/null 2>&1 || :
    fi
fi
