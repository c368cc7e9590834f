"""gRPC face of the operator reads (GatewayAdmin): proto in, admin use case, proto out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from gateway_service.admin import AdminDesk
from gateway_service.interceptor import current_identity
from gateway_service.servicer import unary
from shared.gen.rpcai.gateway.v1 import admin_pb2 as apb
from shared.gen.rpcai.gateway.v1 import admin_pb2_grpc
from shared.gen.rpcai.ledger.v1 import ledger_pb2 as lpb

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext

ADMIN_SERVICE_NAME = apb.DESCRIPTOR.services_by_name["GatewayAdmin"].full_name


class AdminServicer(admin_pb2_grpc.GatewayAdminServicer):
    def __init__(self, desk: AdminDesk) -> None:
        self.desk = desk

    @unary
    async def GetPlatformAnalytics(
        self, request: lpb.GetPlatformAnalyticsRequest, context: Context
    ) -> lpb.GetPlatformAnalyticsResponse:
        return await self.desk.platform_analytics(current_identity(), request)

    @unary
    async def LookupUser(
        self, request: apb.LookupUserRequest, context: Context
    ) -> apb.LookupUserResponse:
        found = await self.desk.lookup_user(
            current_identity(),
            request.user_id,
            request.usage_days,
            request.include_history,
            request.purchases_page_size,
            request.purchases_page_token,
        )
        return apb.LookupUserResponse(
            account=found.account,
            status=found.status,
            usage=found.usage,
            purchases=found.purchases,
        )
